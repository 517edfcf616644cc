"""mlxman's benchmarks: every PRODUCT target measured side by side against the alternative, as ratios."""
