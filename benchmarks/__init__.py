"""Speed and quality benchmarks; results land in benchmarks/results/*.json and BENCHMARKS.md."""
