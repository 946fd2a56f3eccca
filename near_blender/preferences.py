"""Add-on preferences: the default weights folder and device (Preferences > Add-ons > NeAR)."""

from __future__ import annotations

import bpy
from bpy.props import EnumProperty, StringProperty

from .properties import DEVICE_ITEMS

#: The extension's module name (e.g. "bl_ext.user_default.near"); plain "near_blender" when registered directly.
ADDON_ID = __package__.rpartition(".")[0] or __package__


class NearPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    weights_folder: StringProperty(
        name="Weights Folder",
        description="Folder of NeAR weights (our format or the official NeAR layout) used when a scene sets none; "
                    "empty uses the bundled near-tiny model",
        subtype="DIR_PATH",
        default="",
    )
    device: EnumProperty(name="Device", items=DEVICE_ITEMS[1:], default="AUTO",
                         description="Default device for NeAR rendering")

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.prop(self, "weights_folder")
        layout.prop(self, "device")


def preferences() -> NearPreferences | None:
    """The add-on preferences, or None when the add-on is registered without being enabled (tests, scripts)."""
    addon = bpy.context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon is not None else None


def register() -> None:
    bpy.utils.register_class(NearPreferences)


def unregister() -> None:
    bpy.utils.unregister_class(NearPreferences)
