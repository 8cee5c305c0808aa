"""Tests of ftl.tracking."""
