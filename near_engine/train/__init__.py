"""Training near-tiny: data from `near datagen`, stage-2 losses, the loop (single process or DDP)."""
