"""Tests of ftl.finetune."""
