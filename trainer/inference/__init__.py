"""Weights outside training: find a checkpoint, export or run dir, load it in one process, and evaluate."""
