"""Synthetic training data rendered with Blender Cycles (through `near_engine.cycles`, which imports bpy lazily).

`objects` makes seeded procedural objects and materials, `lights` the seeded lighting of each object and the
validation splits, `cameras` the data set's record of its views, `render` builds and renders one object, `dataset`
runs a sharded, resumable set with a manifest and reads it back for training.
"""

from .dataset import DatagenConfig, load_object, run_datagen, write_manifest
from .lights import HELD_OUT_HDRIS, TRAIN_HDRIS, is_validation_object, object_lights
from .objects import ObjectRecipe, make_recipe

__all__ = ["DatagenConfig", "HELD_OUT_HDRIS", "ObjectRecipe", "TRAIN_HDRIS", "is_validation_object", "load_object",
           "make_recipe", "object_lights", "run_datagen", "write_manifest"]
