"""Speed and memory benchmarks (commands that report ratios and measured numbers, never tests)."""
