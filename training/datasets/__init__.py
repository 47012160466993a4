"""Datasets that yield the common multi-task sample (see `training.datasets.common`)."""
