"""Evaluation metrics. Disentanglement metrics live in :mod:`latentzoo.metrics.disentanglement`."""
