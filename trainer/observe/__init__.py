"""What a run shows and records: metrics, progress, trackers, profiler, watchdog and FLOP/memory accounting."""
