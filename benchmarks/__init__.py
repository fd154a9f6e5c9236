"""disagg's benchmarks and GPU recipes: run them as modules from the repo root (python -m benchmarks.NAME)."""
