"""Benchmarks behind ``segray bench``: throughput and latency against the compute ceiling."""
