"""Tests of ftl.fitting."""
