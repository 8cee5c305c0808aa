"""Tests of ftl.predict."""
