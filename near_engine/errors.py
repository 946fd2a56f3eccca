"""The project's own error types: every bad input surfaces as one of these, with a message a user understands."""


class NearError(Exception):
    """Base class for errors that come from bad input rather than from a bug."""


class EnvMapError(NearError):
    """An environment map file or array that cannot be used (corrupt, truncated, wrong channels, zero size...)."""


class AssetError(NearError):
    """A `.near` asset file that cannot be read or fails a check."""


class CameraError(NearError):
    """Camera parameters that describe no valid camera (zero resolution, zero focal length, ...)."""


class RasterError(NearError):
    """Inputs to the rasterizer that are inconsistent (mismatched shapes, NaN parameters, empty image...)."""


class CheckpointError(NearError):
    """Weights that cannot be used: a missing or damaged file, or tensors that do not fit the network."""


class SparseError(NearError):
    """Inconsistent sparse-tensor inputs: mismatched shapes, coordinates off the grid, unsorted or duplicate voxels."""
