"""The `distrain` command: composes configs with Hydra, validates them, writes run directories, launches workers."""
