"""Inference: sliding-window heatmaps, the coarse-to-fine cascade, and the predictor."""
