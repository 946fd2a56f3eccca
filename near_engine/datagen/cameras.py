"""The data set's record of its views: cameras as JSON, and which views are also rendered under the relightings.
(The views themselves are `cycles.views.view_cameras`.)"""

from __future__ import annotations

import numpy as np

from ..camera import Camera


def camera_record(camera: Camera) -> dict:
    """What a training loader needs of a camera, as JSON: OpenCV world-to-camera and pixel intrinsics."""
    return {"world_to_camera": camera.world_to_camera.tolist(), "fx": camera.fx, "fy": camera.fy, "cx": camera.cx,
            "cy": camera.cy, "width": camera.width, "height": camera.height}


def spread_subset(n: int, k: int) -> list[int]:
    """k of n view indices spread evenly over the list (the first Hammersley points alone cluster near one pole)."""
    k = min(k, n)
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)}) if k > 0 else []
