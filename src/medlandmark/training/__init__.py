"""Training engine: sampling, augmentation on the device, heatmap losses, checkpoints, DDP."""
