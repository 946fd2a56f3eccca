"""The Blender add-on: everything that touches bpy. It describes scenes to near_engine and holds no model math.

This stage of the project registers no Blender classes yet; the render engine, panels and operators come with the
Blender-extension issue. register()/unregister() are the extension's entry points and must stay symmetric.
"""

_classes: list[type] = []


def register() -> None:
    import bpy

    for cls in _classes:
        bpy.utils.register_class(cls)


def unregister() -> None:
    import bpy

    for cls in reversed(_classes):
        bpy.utils.unregister_class(cls)
