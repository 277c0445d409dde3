"""Checkpoints: the DCP store (integrity, safe loading) and the manager that decides, packs, restores and checks."""
