"""Per-scene edit settings (``scene.p2v``): saved in the .blend, settable from scripts."""


import bpy
from bpy.props import EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from .settings_map import EDIT_DEFAULTS as D
from .settings_map import SCENE_FIELDS

INJECTION_ITEMS = [
    ("anchor+previous", "Anchor + previous", "Self-attention takes keys and values from the first and the previous frame (paper)"),
    ("anchor", "Anchor", "Only from the first frame"),
    ("previous", "Previous", "Only from the previous frame"),
    ("none", "None", "No feature injection (plain per-frame depth-to-image)"),
]
UPDATE_ITEMS = [
    ("x0", "x0 (closed form)", "Guided update towards the previous frame's prediction, closed form (official code)"),
    ("autograd", "Autograd", "Guided update with the gradient through the UNet (slower)"),
    ("off", "Off", "No guided update"),
]
LAYER_ITEMS = [
    ("decoder", "Decoder", "Inject in the decoder's self-attention layers (paper)"),
    ("all", "All", "Inject in every self-attention layer"),
]
DEPTH_NORM_ITEMS = [
    ("clip", "Clip", "Normalise depth over the whole strip"),
    ("frame", "Frame", "Normalise depth per frame (official code)"),
]
DEPTH_ITEMS = [
    ("ESTIMATE", "Estimate", "Estimate depth from each frame with the model's depth estimator"),
    ("ZPASS", "Z pass", "Render the scene strip's scene through its camera with the Z pass: its true depth"),
]
ZPASS_RENDER_ITEMS = [
    ("PREVIEW", "Quick preview", "The scene's render engine with few samples (Cycles 8 without denoising, Eevee 4; "
                                 "Workbench as set)"),
    ("SCENE", "As the scene is set", "The scene's own render settings (slower)"),
]


class P2VSceneSettings(bpy.types.PropertyGroup):
    """What the next edit of a strip in this scene does."""

    prompt: StringProperty(name="Prompt", description="What the strip should become", default=D["prompt"])
    source_prompt: StringProperty(
        name="Source prompt", default="",
        description="Describes the strip as it is; empty: a caption of its first frame")
    steps: IntProperty(name="Steps", description="DDIM steps for inversion and edit", default=D["steps"], min=1, max=500)
    guidance: FloatProperty(name="Guidance", description="Classifier-free guidance scale",
                            default=D["guidance"], min=0.0, max=100.0, soft_max=20.0)
    seed: IntProperty(name="Seed", default=D["seed"], min=0)
    injection: EnumProperty(name="Injection", items=INJECTION_ITEMS, default=D["injection"],
                            description="Where self-attention features come from")
    layers: EnumProperty(name="Layers", items=LAYER_ITEMS, default=D["layers"],
                         description="Which self-attention layers get the injected features")
    update: EnumProperty(name="Update", items=UPDATE_ITEMS, default=D["update"],
                         description="Guided latent update towards the previous frame")
    update_delta: FloatProperty(name="Update step", default=D["update_delta"], min=0.0, max=1e7, soft_max=1000.0,
                                description="Step size of the guided update (tuned for 512x512)")
    update_steps: IntProperty(name="Update until", default=D["update_steps"], min=0, max=1000,
                              description="Last step index of the guided update, counted on 50 steps")
    size: IntProperty(name="Size", description="Long side of the working size (multiple of 64)",
                      default=D["size"], min=64, max=4096, step=64)
    depth_norm: EnumProperty(name="Depth normalisation", items=DEPTH_NORM_ITEMS, default=D["depth_norm"])
    depth: EnumProperty(name="Depth", items=DEPTH_ITEMS, default="ESTIMATE",
                        description="Where the depth that conditions the edit comes from")
    zpass_render: EnumProperty(name="Render", items=ZPASS_RENDER_ITEMS, default="PREVIEW",
                               description="How the scene strip is rendered for its Z pass (the user's scene is not changed)")


def scene_values(props) -> dict:
    """The fields of ``scene.p2v`` as plain values, for ``settings_map.job_settings``.

    A function, not a method: a registered PropertyGroup class with Python methods makes the
    bpy 4.2 module crash when the interpreter exits.
    """
    return {name: getattr(props, name) for name in SCENE_FIELDS}


CLASSES = (P2VSceneSettings,)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.p2v = PointerProperty(type=P2VSceneSettings, name="Pix2Video")


def unregister() -> None:
    del bpy.types.Scene.p2v
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
