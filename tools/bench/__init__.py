"""Benchmarks: tools/bench/run NAME runs tools.bench.NAME; its last line is JSON."""
