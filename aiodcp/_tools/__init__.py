"""Tools: the CLI and the benchmarks."""
