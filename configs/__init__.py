"""distrain's Hydra config tree, shipped as package data (searched as pkg://distrain.configs)."""
