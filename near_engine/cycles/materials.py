"""Materials that write the G-buffer: base colour, roughness, metallic and Specular IOR Level as Cycles AOVs.

`configure_cycles` adds the matching AOV passes to the view layer; a procedural material (`datagen.objects`) writes
them itself, an imported mesh's materials get them from `add_material_aovs`.
"""

from __future__ import annotations

# Arbitrary Output Variables the material writes, so Cycles renders them as G-buffer passes: name -> AOV type.
AOVS = {"base_color": "COLOR", "roughness": "VALUE", "metallic": "VALUE", "specular": "VALUE"}

#: Principled BSDF inputs behind each AOV, and what a surface without a Principled BSDF writes (Blender's defaults).
_AOV_INPUTS = {"base_color": "Base Color", "roughness": "Roughness", "metallic": "Metallic",
               "specular": "Specular IOR Level"}
_AOV_DEFAULTS = {"base_color": (0.8, 0.8, 0.8, 1.0), "roughness": 0.5, "metallic": 0.0, "specular": 0.5}


def add_material_aovs(objects) -> None:
    """Make every material of `objects` (imported meshes) write the G-buffer AOVs of `AOVS` from its Principled
    BSDF: a linked input (an image texture, say) is linked into the AOV, an unlinked one is written as its value.
    A material without a Principled BSDF writes its viewport colour and Blender's default roughness, metallic and
    specular; an object without materials gets a plain default Principled material."""
    import bpy

    for obj in objects:
        if not obj.material_slots or all(slot.material is None for slot in obj.material_slots):
            material = bpy.data.materials.new("near_default")
            material.use_nodes = True
            obj.data.materials.append(material)
        for slot in obj.material_slots:
            material = slot.material
            if material is None:
                continue
            if not material.use_nodes:
                material.use_nodes = True
            tree = material.node_tree
            bsdf = next((n for n in tree.nodes if n.type == "BSDF_PRINCIPLED"), None)
            for name, kind in AOVS.items():
                aov = tree.nodes.new("ShaderNodeOutputAOV")
                aov.aov_name = name
                target = aov.inputs["Color" if kind == "COLOR" else "Value"]
                if bsdf is None:
                    target.default_value = (tuple(material.diffuse_color) if name == "base_color"
                                            else _AOV_DEFAULTS[name])
                    continue
                source = bsdf.inputs[_AOV_INPUTS[name]]
                if source.is_linked:
                    tree.links.new(source.links[0].from_socket, target)
                else:
                    value = source.default_value
                    target.default_value = tuple(value) if kind == "COLOR" else float(value)
