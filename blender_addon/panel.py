"""The Sequencer sidebar tab "Pix2Video": the scene's edit settings, the Edit button, progress."""

from __future__ import annotations

import bpy

from . import compat, operators, preferences, properties, runtime_process
from . import job as job_module
from ._vendor import settings as schema


def prefs_output_dir(context) -> str:
    prefs = preferences.addon_preferences(context)
    return prefs.output_dir if prefs is not None else ""


def draw_settings(layout, props, advanced: bool) -> None:
    """The scene's edit settings, in the schema's order; optional texts show what empty means."""
    for f in properties.fields(schema.SCENE, advanced):
        spec = schema.spec_of(f)
        if spec.shown_when is not None and getattr(props, spec.shown_when[0]) != spec.shown_when[1]:
            continue
        if spec.empty and schema.kind_of(f) is str:
            layout.prop(props, f.name, placeholder=spec.empty)
        else:
            layout.prop(props, f.name)


class SEQUENCER_PT_p2v(bpy.types.Panel):
    bl_space_type = "SEQUENCE_EDITOR"
    bl_region_type = "UI"
    bl_category = "Pix2Video"
    bl_label = "Pix2Video"

    @classmethod
    def poll(cls, context):
        space = getattr(context, "space_data", None)
        return space is None or getattr(space, "view_type", "SEQUENCER") in ("SEQUENCER", "SEQUENCER_PREVIEW")

    def draw(self, context):
        layout = self.layout
        scene = compat.sequencer_scene(context)
        props = scene.p2v
        layout.use_property_split = True
        layout.use_property_decorate = False

        strip = compat.active_strip(scene)
        layout.label(text=f"Strip: {strip.name}" if strip is not None else "No active strip", icon="SEQUENCE")
        source = operators.result_source(scene, strip)
        if strip is not None and strip.get("p2v_source") is not None:
            box = layout.box()
            box.label(text=f"Result of '{strip['p2v_source']}': {strip.get('p2v_prompt', '')}", icon="INFO")
            row = box.row()
            row.operator("sequencer.p2v_load_settings", icon="IMPORT")
            row.operator("sequencer.p2v_reedit", icon="FILE_REFRESH")
            if source is None:
                box.label(text="Its source strip is not in this scene", icon="ERROR")
        draw_settings(layout.column(), props, advanced=False)

        running = job_module.current_job()
        if running is None:
            row = layout.row(align=True)
            row.scale_y = 1.5
            row.operator("sequencer.p2v_preview", text="Preview", icon="IMAGE_DATA")
            row.operator("sequencer.p2v_edit", text="Edit Strip", icon="SHADERFX")
            selected = len(operators.selected_strips(scene))
            if selected > 1:
                layout.operator(
                    "sequencer.p2v_edit_selected", text=f"Edit {selected} Selected Strips", icon="SEQ_STRIP_DUPLICATE"
                )
            reason = operators.unavailable_reason(context)
            if reason is not None:
                layout.label(text=reason, icon="INFO")
            output_dir = (prefs_output_dir(context) or "//").strip()
            if not bpy.data.filepath and output_dir.startswith("//"):
                layout.label(text="File not saved: frames wait in the temp folder until it is", icon="ERROR")
        else:
            compat.layout_progress(
                layout,
                running.progress,
                f"{running.frames_done}/{running.edited_total} frames of '{running.strip_name}', {running.stage_text}",
            )
            layout.operator("sequencer.p2v_cancel", text="Cancel", icon="CANCEL")

        box = layout.box()
        prefs = preferences.addon_preferences(context)
        process = runtime_process.current()
        if prefs is not None and prefs.runtime_mode == "REMOTE":
            where = runtime_process.address_of(prefs.host.strip(), prefs.port)
            box.label(text=f"Runtime: {where}{' (TLS)' if prefs.tls_ca else ''}", icon="URL")
        elif process is not None:
            box.label(text=f"Runtime: running (pid {process.pid})", icon="CHECKMARK")
        else:
            box.label(text="Runtime: starts with the first edit", icon="TIME")
        box.operator("p2v.release_runtime", icon="X")


class SEQUENCER_PT_p2v_advanced(bpy.types.Panel):
    bl_space_type = "SEQUENCE_EDITOR"
    bl_region_type = "UI"
    bl_category = "Pix2Video"
    bl_label = "Advanced"
    bl_parent_id = "SEQUENCER_PT_p2v"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        props = compat.sequencer_scene(context).p2v
        layout.use_property_split = True
        layout.use_property_decorate = False
        draw_settings(layout.column(), props, advanced=True)


CLASSES = (SEQUENCER_PT_p2v, SEQUENCER_PT_p2v_advanced)
register, unregister = bpy.utils.register_classes_factory(CLASSES)
