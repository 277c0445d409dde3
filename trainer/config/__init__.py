"""What a run is told: the typed config schema, paths in configs, and the run directory's file names and statuses."""
