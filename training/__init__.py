"""Datasets, losses, metrics and the three-stage AdaMTL training recipe."""
