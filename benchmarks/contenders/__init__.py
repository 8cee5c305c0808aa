"""The contenders of benchmarks/extract.py: each runs as its own process, started by benchmarks/extract.py."""
