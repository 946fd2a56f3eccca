"""Training near-tiny (issue 5): data from `near datagen`, stage-2 losses, the loop (single process or DDP)."""

from .encode import encode_views

__all__ = ["encode_views"]
