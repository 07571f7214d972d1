"""Lab harness shared by tests, benchmarks and the demo: virtual boards and agent processes."""
