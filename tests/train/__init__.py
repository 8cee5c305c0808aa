"""Tests of ftl.train."""
