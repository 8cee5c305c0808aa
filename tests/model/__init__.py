"""Tests of ftl.model."""
