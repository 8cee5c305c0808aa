"""Tests of ftl.extract."""
