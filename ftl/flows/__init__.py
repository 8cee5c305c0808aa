"""Composition: the only place where stages meet (run, sweep, probe-then-finetune)."""
