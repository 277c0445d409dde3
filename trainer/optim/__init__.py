"""Optimizers (a registry that knows each one's state bytes) and the learning-rate schedule."""
