"""The lighting recipes and splits of the data set: which lights (`cycles.lights.Light`) each object gets, seeded.

Splits: the HDRIs `HELD_OUT_HDRIS` and every tenth object (`is_validation_object`) never light a training image.
'city' (hard sunlit street) and 'night' (dark, few bright lamps) are held out because they are the two least like the
others, which makes them a hard test of relighting rather than of memorized light; the six others train.
"""

from __future__ import annotations

import math

import numpy as np

from ..cycles.lights import AREA_WORLD_GREY, Light
from ..errors import NearError

HDRIS = ("forest", "sunset", "studio", "city", "courtyard", "interior", "night", "sunrise")
HELD_OUT_HDRIS = ("city", "night")
TRAIN_HDRIS = tuple(h for h in HDRIS if h not in HELD_OUT_HDRIS)


def is_validation_object(index: int) -> bool:
    """Every tenth object (index 9, 19, ...) is held out for validation."""
    return index % 10 == 9


def object_lights(seed: int, index: int, n_hdri: int, validation: bool | None = None, skies: int = 0,
                  area: bool = True) -> list[Light]:
    """The relighting conditions of one object (seeded): `n_hdri` training HDRIs at random rotations and strengths,
    `skies` (0 or 1) sun-and-sky worlds at a random sun position, and (with `area`) one random area light.

    Validation objects (default: `is_validation_object(index)`) are the evaluation set: they are lit by the held-out
    HDRIs as well.
    """
    if skies not in (0, 1):
        raise NearError(f"skies per object must be 0 or 1, got {skies}")
    if not 0 <= n_hdri <= len(TRAIN_HDRIS):
        raise NearError(f"HDRIs per object must be between 0 and {len(TRAIN_HDRIS)}, got {n_hdri}")
    rng = np.random.default_rng([seed, index, 1])
    names = list(rng.choice(TRAIN_HDRIS, size=n_hdri, replace=False))
    if is_validation_object(index) if validation is None else validation:
        names += HELD_OUT_HDRIS
    lights = [Light("hdri", hdri=str(name), rotation_z=float(rng.uniform(0, 2 * math.pi)),
                    strength=float(rng.uniform(0.5, 1.5))) for name in names]
    if skies:
        sky_rng = np.random.default_rng([seed, index, 3])  # its own stream: older data sets keep their lights
        lights.append(Light("sky", strength=float(sky_rng.uniform(0.5, 1.5)),
                            sun_elevation=float(np.arcsin(sky_rng.uniform(0.05, 0.95))),
                            sun_rotation=float(sky_rng.uniform(0, 2 * math.pi))))
    if area:
        lights.append(Light("area", strength=AREA_WORLD_GREY, energy=float(rng.uniform(300, 500)),
                            location=(float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)),
                                      float(rng.uniform(0.5, 1.5)))))
    return lights
