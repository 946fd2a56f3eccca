"""NeAR engine: relightable 3D Gaussian objects rendered under HDR environment maps. Never imports bpy at module level."""

__version__ = "0.1.0"
