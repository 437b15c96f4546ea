"""experiments: experiment definitions (quickstart, paper grid, smoke tests); configs only, no logic."""
