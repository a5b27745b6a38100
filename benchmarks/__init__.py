"""Benchmark suite: zokernels kernels against the device copy bandwidth, ZO steps against MeZO.

Run ``python -m benchmarks --help``; results land in benchmarks/results/<gpu>-<date>.{json,md,png}.
"""
