"""Tests of ftl.config."""
