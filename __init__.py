"""Blender extension entry point: everything lives in near_blender; this file only hands over."""

from .near_blender import register, unregister

__all__ = ["register", "unregister"]
