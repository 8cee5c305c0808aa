"""Tests of ftl.sources."""
