"""Project tooling: benchmarks, demo, and the lab harness (virtual boards, agent processes)."""
