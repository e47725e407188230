"""Pix2Video for Blender's Video Sequence Editor: edit a strip with a text prompt.

The edit runs in a separate runtime process (``p2v serve``) that has torch; this add-on uses only
bpy and the standard library and talks to the runtime over a socket. See README.md in the
project and docs/design.md for the layout. Registration only here: no work at import or register
time.
"""

bl_info = {  # read only when installed as a legacy add-on; extensions use blender_manifest.toml
    "name": "Pix2Video",
    "author": "Pix2Video for Blender developers",
    "version": (0, 1, 0),
    "blender": (4, 2, 0),
    "location": "Sequencer > Sidebar > Pix2Video",
    "description": "Edit a strip with a text prompt (Pix2Video) using a sidecar runtime",
    "category": "Sequencer",
}

_MODULES = ("properties", "preferences", "operators", "panel")


def _modules():
    import importlib

    return [importlib.import_module(f"{__package__}.{name}") for name in _MODULES]


def register():
    for module in _modules():
        module.register()


def unregister():
    for module in reversed(_modules()):
        module.unregister()
