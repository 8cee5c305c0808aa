"""Tests of ftl.io."""
