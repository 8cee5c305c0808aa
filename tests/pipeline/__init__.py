"""Tests of ftl.pipeline."""
