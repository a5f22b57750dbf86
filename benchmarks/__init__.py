"""Throughput benchmarks (not tests: they time things and print tables).

`python -m benchmarks.throughput` measures a CPU machine; `benchmarks/gpu.sh` a CUDA one.
"""
