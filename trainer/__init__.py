"""Everything that runs inside a distrain worker process (and the pieces `distrain eval` reuses)."""
