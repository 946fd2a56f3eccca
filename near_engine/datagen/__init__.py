"""Synthetic training data rendered with Blender Cycles through the bpy module (imported lazily, inside functions).

`objects` makes seeded procedural objects and materials, `lights` the lighting (uniform, HDRIs, area lights) and the
validation splits, `cameras` the Hammersley views, `render` drives Cycles for one object, `dataset` runs a sharded,
resumable set with a manifest and reads it back for training.
"""

from .dataset import DatagenConfig, load_object, run_datagen, write_manifest
from .lights import HELD_OUT_HDRIS, TRAIN_HDRIS, is_validation_object, object_lights
from .objects import ObjectRecipe, make_recipe

__all__ = ["DatagenConfig", "HELD_OUT_HDRIS", "ObjectRecipe", "TRAIN_HDRIS", "is_validation_object", "load_object",
           "make_recipe", "object_lights", "run_datagen", "write_manifest"]
