"""GPU measurements that benchmarks/gpu_check.sh runs beside benchmarks/extract.py."""
