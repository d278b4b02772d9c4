"""Benchmarks of raydpo against other implementations (`raydpo bench`: benchmarks/bench.py)."""
