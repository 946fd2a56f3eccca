"""The Blender/Cycles driver, through the bpy module (imported lazily, inside functions; never at module level).

`settings` configures Cycles, `views` places the cameras, `lights` sets up worlds and lamps, `materials` makes
materials write the G-buffer AOVs, `meshes` imports and normalizes mesh files (the importer itself runs in a child
process, `import_process`, after the header checks of `mesh_files`), `render` renders views into plain EXRs, and
`quiet` keeps Blender's render log off the terminal. Used by datagen, encode-mesh, the demo, training's data
loader and the add-on.
"""
