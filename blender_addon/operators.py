"""Operators: edit the active strip (modal), cancel it, set up / check / release the runtime.

Threading: sockets, subprocesses and pip run in worker threads; bpy is touched only here, on the
main thread, from the modal operator's timer (``EditJob.poll``) or from ``bpy.app.timers``.
"""

import json
import os

import bpy
from bpy.props import BoolProperty

from . import compat, model_fetch, output_strip, preferences, properties, runtime_process, runtime_setup
from . import job as job_module
from ._vendor.settings import SettingsError
from .errors import P2VAddonError, StripTooLong

TIMER_INTERVAL = 0.05


def build_job(context, strip=None, *, confirmed: bool = False, preview: bool = False) -> job_module.EditJob:
    """An :class:`EditJob` for ``strip`` (default: the active one), from the scene's settings and the
    preferences."""
    scene = compat.sequencer_scene(context)
    prefs = preferences.addon_preferences(context)
    try:
        settings = properties.job_settings(scene, prefs)
    except SettingsError as exc:
        raise P2VAddonError(str(exc)) from None
    return job_module.EditJob(
        scene,
        strip if strip is not None else compat.active_strip(scene),
        settings,
        preferences.runtime_config(prefs),
        output_dir=prefs.output_dir if prefs is not None else "",
        max_frames=prefs.max_frames if prefs is not None else 0,
        confirmed=confirmed,
        preview=preview,
    )


def strip_problem(scene, strip) -> str | None:
    """Why ``strip`` cannot be edited with the scene's settings, or None (a quick check for poll)."""
    kind = compat.strip_kind(strip)
    if kind not in ("image", "movie", "scene"):
        return f"'{strip.name}' is {compat.a_kind(kind)} strip; Pix2Video edits image, movie and scene strips"
    props = getattr(scene, "p2v", None)
    if props is not None and props.depth == "zpass" and kind != "scene":
        return f"Depth 'Z pass' needs a scene strip; '{strip.name}' is {compat.a_kind(kind)} strip"
    return None


def unavailable_reason(context) -> str | None:
    """Why the edit cannot start now, or None (shown by the operator's poll and the panel)."""
    if job_module.current_job() is not None:
        return "A Pix2Video edit is running"
    scene = compat.sequencer_scene(context)
    if scene is None or scene.sequence_editor is None:
        return "The scene has no strips"
    strip = compat.active_strip(scene)
    if strip is None:
        return "No active strip: click the strip to edit"
    return strip_problem(scene, strip)


def result_source(scene, strip):
    """The strip a result strip was made from (its ``p2v_source``), or None."""
    if strip is None or scene.sequence_editor is None:
        return None
    name = strip.get("p2v_source")
    return compat.all_strips(scene.sequence_editor).get(name) if isinstance(name, str) else None


def selected_strips(scene) -> list:
    """The selected strips Pix2Video can edit, in timeline order (then channel)."""
    if scene is None or scene.sequence_editor is None:
        return []
    chosen = [s for s in compat.strips(scene.sequence_editor) if s.select and strip_problem(scene, s) is None]
    return sorted(chosen, key=lambda s: (s.frame_final_start, s.channel))


class _StripQueue:
    """Edits strips one after another, modal with a worker thread in the UI, to the end otherwise.

    Subclasses say which strips (:meth:`strips`) and whether it is a preview. Esc cancels the
    running edit and the ones waiting; frames already edited stay. The report says how each went.
    """

    bl_options = {"REGISTER", "UNDO"}
    preview = False

    confirm_long: BoolProperty(
        name="Confirm long strip",
        default=False,
        options={"HIDDEN", "SKIP_SAVE"},
        description="Edit even when the strip has more frames than the preference allows",
    )

    _timer = None
    _job: job_module.EditJob | None = None

    def strips(self, context) -> list:
        raise NotImplementedError

    def invoke(self, context, event):
        return self._begin(context, event)

    def execute(self, context):
        return self._begin(context, None)

    @staticmethod
    def _threaded(context) -> bool:
        """A worker thread and a modal timer with an event loop; else all on this thread."""
        return not (bpy.app.background or context.window is None)

    def _begin(self, context, event):
        self._queue = [strip.name for strip in self.strips(context)]
        self._outcomes: list[tuple[str, str, str]] = []  # (strip, state, message)
        self._cancelled = False
        try:
            job = self._next_job(context)
        except StripTooLong as exc:
            if event is None:
                self.report({"ERROR"}, str(exc))
                return {"CANCELLED"}
            self.confirm_long = True
            return context.window_manager.invoke_confirm(
                self,
                event,
                title="Edit a long strip?",
                message=f"The strip has {exc.frames} frames (limit {exc.limit}); editing may take long.",
            )
        if job is None:
            return self._finished(context)
        if not self._threaded(context):
            # No event loop to drive a modal operator (scripts, blender -b): run each job to its
            # end here, on this thread, with no worker thread (see EditJob.run_here).
            while job is not None:
                job.run_started()
                self._ended(context, job)
                job = self._next_job(context)
            return self._finished(context)
        self._job = job
        self._timer = context.window_manager.event_timer_add(TIMER_INTERVAL, window=context.window)
        context.window_manager.modal_handler_add(self)
        self._status(context)
        return {"RUNNING_MODAL"}

    def _next_job(self, context) -> job_module.EditJob | None:
        """Start the next strip's job; a strip that cannot start is reported and skipped."""
        scene = compat.sequencer_scene(context)
        while self._queue and not self._cancelled:
            name = self._queue.pop(0)
            strip = compat.all_strips(scene.sequence_editor).get(name) if scene.sequence_editor else None
            try:
                job = build_job(context, strip, confirmed=self.confirm_long, preview=self.preview)
                return job.start(threaded=self._threaded(context))
            except StripTooLong:
                if self._outcomes or self._queue:  # one of several: report it and go on
                    self._outcomes.append((name, "failed", "longer than the preference allows"))
                    continue
                raise
            except P2VAddonError as exc:
                self._outcomes.append((name, "failed", str(exc)))
        return None

    def modal(self, context, event):
        job = self._job
        if event.type == "TIMER":
            if not job.poll():
                self._ended(context, job)
                self._job = self._next_job(context)
                if self._job is None:
                    return self._finished(context)
            self._status(context)
            compat.redraw_sequencer(context)
            return {"RUNNING_MODAL"}
        if event.type == "ESC" and event.value == "PRESS":
            self._cancelled = True
            job.cancel()
            self.report({"INFO"}, "Cancelling the Pix2Video edit...")
            return {"RUNNING_MODAL"}
        if event.type == "Z" and (event.ctrl or event.oskey) and event.value == "PRESS":
            # Undo would take away the strip that is growing; wait for the job (or press Esc).
            self.report({"WARNING"}, "Undo waits until the Pix2Video edit ends (Esc cancels it)")
            return {"RUNNING_MODAL"}
        return {"PASS_THROUGH"}

    def _status(self, context):
        job = self._job
        workspace = getattr(context, "workspace", None)
        if workspace is not None and job is not None:
            waiting = f", {len(self._queue)} strip(s) waiting" if self._queue else ""
            workspace.status_text_set(
                f"Pix2Video: {job.progress:.0%}, {job.frames_done}/{job.edited_total} frames of '{job.strip_name}', "
                f"{job.stage_text}{waiting} (Esc to cancel)"
            )

    def _ended(self, context, job) -> None:
        self._outcomes.append((job.strip_name, job.state, job.message))
        if job.state == "cancelled":
            self._cancelled = True
        if self.preview and job.state == "done":
            show_preview(context, job)

    def _finished(self, context):
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None
        workspace = getattr(context, "workspace", None)
        if workspace is not None and not bpy.app.background:
            workspace.status_text_set(None)
        compat.redraw_sequencer(context)
        outcomes = self._outcomes
        if not outcomes:
            self.report({"ERROR"}, "No strip to edit")
            return {"CANCELLED"}
        states = {state for _, state, _ in outcomes}
        level = "INFO" if states == {"done"} else ("WARNING" if "failed" not in states else "ERROR")
        if len(outcomes) == 1:
            self.report({level}, outcomes[0][2])
        else:
            done = sum(state == "done" for _, state, _ in outcomes)
            details = "; ".join(f"'{name}': {message}" for name, state, message in outcomes if state != "done")
            self.report({level}, f"Edited {done} of {len(outcomes)} strips" + (f" ({details})" if details else ""))
        # Frames that arrived are in the scene either way: keep them in the undo history.
        return {"FINISHED"} if any(state != "new" for _, state, _ in outcomes) else {"CANCELLED"}


def show_preview(context, job) -> None:
    """The preview's frame replaces the source's earlier previews (their files stay) and shows in
    every open Image Editor, as the image "P2V Preview"."""
    scene, output = job.scene, job.output
    new = output.strip()
    editor = scene.sequence_editor
    for strip in list(compat.strips(editor)):
        if strip != new and strip.get("p2v_preview") and strip.get("p2v_source") == job.strip_name:
            compat.strips(editor).remove(strip)
    path = os.path.join(output.folder, output.files[0])
    image = bpy.data.images.get(PREVIEW_IMAGE)
    if image is None:
        image = bpy.data.images.load(path, check_existing=False)
        image.name = PREVIEW_IMAGE
    else:
        image.filepath = path
        image.reload()
    for window in context.window_manager.windows:
        for area in window.screen.areas if window.screen else ():
            if area.type == "IMAGE_EDITOR":
                area.spaces.active.image = image


PREVIEW_IMAGE = "P2V Preview"


class _ActiveStrip(_StripQueue):
    @classmethod
    def poll(cls, context):
        reason = unavailable_reason(context)
        if reason is not None:
            cls.poll_message_set(reason)
            return False
        return True

    def strips(self, context) -> list:
        return [compat.active_strip(compat.sequencer_scene(context))]


class SEQUENCER_OT_p2v_edit(_ActiveStrip, bpy.types.Operator):
    """Edit the active strip with Pix2Video into a new image strip above it"""

    bl_idname = "sequencer.p2v_edit"
    bl_label = "Edit Strip"


class SEQUENCER_OT_p2v_preview(_ActiveStrip, bpy.types.Operator):
    """Edit only the anchor (Anchor: the first frame of the range by default) to judge a look in
    seconds; the whole edit then starts from its cached inversion and gives the same frame"""

    bl_idname = "sequencer.p2v_preview"
    bl_label = "Preview Frame"
    preview = True


class SEQUENCER_OT_p2v_edit_selected(_StripQueue, bpy.types.Operator):
    """Edit every selected image, movie or scene strip, one after another"""

    bl_idname = "sequencer.p2v_edit_selected"
    bl_label = "Edit Selected Strips"

    @classmethod
    def poll(cls, context):
        if job_module.current_job() is not None:
            cls.poll_message_set("A Pix2Video edit is running")
            return False
        if not selected_strips(compat.sequencer_scene(context)):
            cls.poll_message_set("Select the image, movie or scene strips to edit")
            return False
        return True

    def strips(self, context) -> list:
        return selected_strips(compat.sequencer_scene(context))


class SEQUENCER_OT_p2v_reedit(_StripQueue, bpy.types.Operator):
    """Edit the source of the active result strip again, with the settings in the panel"""

    bl_idname = "sequencer.p2v_reedit"
    bl_label = "Re-edit Source"

    @classmethod
    def poll(cls, context):
        scene = compat.sequencer_scene(context)
        if job_module.current_job() is not None:
            cls.poll_message_set("A Pix2Video edit is running")
            return False
        active = compat.active_strip(scene) if scene is not None else None
        source = result_source(scene, active) if scene is not None else None
        if source is None:
            cls.poll_message_set("The active strip is not a Pix2Video result whose source is in this scene")
            return False
        reason = strip_problem(scene, source)
        if reason is not None:
            cls.poll_message_set(reason)
            return False
        return True

    def strips(self, context) -> list:
        scene = compat.sequencer_scene(context)
        return [result_source(scene, compat.active_strip(scene))]


class SEQUENCER_OT_p2v_load_settings(bpy.types.Operator):
    """Put the settings the active result strip was made with into the panel (to change and re-edit)"""

    bl_idname = "sequencer.p2v_load_settings"
    bl_label = "Load Its Settings"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        scene = compat.sequencer_scene(context)
        strip = compat.active_strip(scene) if scene is not None else None
        if strip is None or not isinstance(strip.get("p2v_settings"), str):
            cls.poll_message_set("The active strip is not a Pix2Video result")
            return False
        return True

    def execute(self, context):
        scene = compat.sequencer_scene(context)
        strip = compat.active_strip(scene)
        try:
            loaded = properties.load_scene_settings(scene, json.loads(strip["p2v_settings"]))
        except (ValueError, TypeError) as exc:
            self.report({"ERROR"}, f"The settings recorded on '{strip.name}' cannot be read: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Loaded {len(loaded)} setting(s) of '{strip.name}' into the panel")
        return {"FINISHED"}


class SEQUENCER_OT_p2v_cancel(bpy.types.Operator):
    """Stop the running Pix2Video edit; frames already edited stay as a shorter strip"""

    bl_idname = "sequencer.p2v_cancel"
    bl_label = "Cancel Edit"

    @classmethod
    def poll(cls, context):
        if job_module.current_job() is None:
            cls.poll_message_set("No Pix2Video edit is running")
            return False
        return True

    def execute(self, context):
        job = job_module.current_job()
        if job is not None:
            job.cancel()
        return {"FINISHED"}


class P2V_OT_release_runtime(bpy.types.Operator):
    """Stop the local runtime and free its GPU memory (it starts again with the next edit)"""

    bl_idname = "p2v.release_runtime"
    bl_label = "Release Runtime"

    @classmethod
    def poll(cls, context):
        if job_module.current_job() is not None:
            cls.poll_message_set("An edit is running: cancel it first")
            return False
        return True

    def execute(self, context):
        if runtime_process.release():
            self.report({"INFO"}, "Stopped the Pix2Video runtime")
        else:
            self.report({"INFO"}, "No local Pix2Video runtime was running")
        return {"FINISHED"}


class P2V_OT_check_runtime(bpy.types.Operator):
    """Check the runtime: for a local one, what its Python has and which torch device it finds"""

    bl_idname = "p2v.check_runtime"
    bl_label = "Check Runtime"

    @classmethod
    def poll(cls, context):
        if runtime_setup.check_running():
            cls.poll_message_set("A check is running")
            return False
        return True

    def execute(self, context):
        prefs = preferences.addon_preferences(context)
        try:
            config = preferences.runtime_config(prefs)
        except P2VAddonError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        thread = runtime_setup.start_check(_run_check, config)
        _watch(lambda: not thread.is_alive())
        return {"FINISHED"}


def _run_check(config: runtime_process.RuntimeConfig) -> None:
    if config.mode == "REMOTE":
        try:
            client = runtime_process.connect(config, None)
            with client:
                seconds = client.ping()
                server = client.server_info.get("server", "p2v runtime")
            runtime_setup.set_check_text(f"{server} at {config.where} answers ({seconds * 1000:.1f} ms)")
        except P2VAddonError as exc:
            runtime_setup.set_check_text(str(exc))
        except Exception as exc:  # noqa: BLE001 - the check reports whatever went wrong
            runtime_setup.set_check_text(f"Check failed: {exc}")
        return
    runtime_setup.set_check_text(runtime_process.describe_check(runtime_process.check_python(config.python)))


class P2V_OT_setup_runtime(bpy.types.Operator):
    """Make a virtual environment in the add-on's user folder and install the runtime (with torch) into it"""

    bl_idname = "p2v.setup_runtime"
    bl_label = "Set Up Runtime"

    @classmethod
    def poll(cls, context):
        task = runtime_setup.current_task()
        if task is not None and task.state == "running":
            cls.poll_message_set("The set-up is running")
            return False
        return True

    def execute(self, context):
        prefs = preferences.addon_preferences(context)
        package = (
            prefs.runtime_package.strip()
            if prefs is not None and prefs.runtime_package.strip()
            else preferences.bundled_runtime_package()
        )
        venv_dir = preferences.default_venv_dir()
        runtime_process.release()
        task = runtime_setup.start_task(
            runtime_setup.SetupTask(
                preferences.base_python(prefs),
                venv_dir,
                [package],
                torch_index_url=prefs.torch_index_url if prefs is not None else "",
                detect_torch=True,
                log_path=os.path.join(preferences.log_dir(), "setup.log"),
            )
        )

        def finished() -> bool:
            if task.state == "running":
                return False
            if task.state == "done":
                current = preferences.addon_preferences()
                if current is not None:
                    current.runtime_mode = "LOCAL"
                    current.python = task.python
                runtime_setup.set_check_text(task.message)
            return True

        _watch(finished)
        self.report({"INFO"}, f"Setting up the Pix2Video runtime in {venv_dir}")
        return {"FINISHED"}


class P2V_OT_fetch_models(bpy.types.Operator):
    """Download the edit model and the captioner into the local runtime's model cache now, with
    progress, rather than at the start of the first edit"""

    bl_idname = "p2v.fetch_models"
    bl_label = "Download Models"

    @classmethod
    def poll(cls, context):
        task = model_fetch.current_task()
        if task is not None and task.state == "running":
            cls.poll_message_set("The download is running")
            return False
        prefs = preferences.addon_preferences(context)
        if prefs is not None and prefs.runtime_mode == "REMOTE":
            cls.poll_message_set("A remote runtime fetches its models on its own machine (p2v models fetch)")
            return False
        return True

    def execute(self, context):
        prefs = preferences.addon_preferences(context)
        config = preferences.runtime_config(prefs)
        wanted = properties.values(prefs, properties.schema.PREFERENCES) if prefs is not None else {}
        defaults = properties.schema.EditSettings()
        settings = {
            name: wanted.get(name) or getattr(defaults, name) for name in ("model", "captioner", "dtype", "device")
        }
        task = model_fetch.start_task(
            model_fetch.ModelFetchTask(config.python, settings, python_hint=config.python_hint)
        )
        _watch(lambda: task.state != "running")
        self.report({"INFO"}, f"Downloading {settings['model']} and {settings['captioner']}")
        return {"FINISHED"}


class P2V_OT_cancel_fetch(bpy.types.Operator):
    """Stop the model download (the files already fetched stay)"""

    bl_idname = "p2v.cancel_fetch"
    bl_label = "Stop Download"

    def execute(self, context):
        task = model_fetch.current_task()
        if task is not None:
            task.cancel()
        return {"FINISHED"}


class P2V_OT_cancel_setup(bpy.types.Operator):
    """Stop the runtime set-up"""

    bl_idname = "p2v.cancel_setup"
    bl_label = "Cancel Set-Up"

    def execute(self, context):
        task = runtime_setup.current_task()
        if task is not None:
            task.cancel()
        return {"FINISHED"}


_watchers: list = []


def _watch(done) -> None:
    """Redraw the UI every half second until ``done()`` is true (a ``bpy.app.timers`` timer)."""

    def tick():
        finished = done()
        compat.redraw_sequencer()
        if finished:
            if tick in _watchers:
                _watchers.remove(tick)
            return None
        return 0.5

    _watchers.append(tick)
    bpy.app.timers.register(tick, first_interval=0.2)


CLASSES = (
    SEQUENCER_OT_p2v_edit,
    SEQUENCER_OT_p2v_preview,
    SEQUENCER_OT_p2v_edit_selected,
    SEQUENCER_OT_p2v_reedit,
    SEQUENCER_OT_p2v_load_settings,
    SEQUENCER_OT_p2v_cancel,
    P2V_OT_release_runtime,
    P2V_OT_check_runtime,
    P2V_OT_setup_runtime,
    P2V_OT_cancel_setup,
    P2V_OT_fetch_models,
    P2V_OT_cancel_fetch,
)


@bpy.app.handlers.persistent
def keep_frames_with_the_file(filepath, *_):
    """First save of a file that was never saved: its results' frames move beside it (``//p2v/``)."""
    if bpy.data.filepath or not filepath:
        return
    running = job_module.current_job()
    skip = (running.output.folder,) if running is not None and running.output is not None else ()
    try:
        output_strip.move_unsaved_frames(filepath, skip)
    except (OSError, P2VAddonError) as exc:
        print(f"Pix2Video: could not move the edited frames beside {filepath}: {exc}")


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.app.handlers.save_pre.append(keep_frames_with_the_file)


def unregister() -> None:
    for tick in list(_watchers):
        if bpy.app.timers.is_registered(tick):
            bpy.app.timers.unregister(tick)
    _watchers.clear()
    running = job_module.current_job()
    if running is not None:
        running.cancel()
        running.wait(timeout=30)
    runtime_setup.reset()
    model_fetch.reset()
    runtime_process.release()
    if keep_frames_with_the_file in bpy.app.handlers.save_pre:
        bpy.app.handlers.save_pre.remove(keep_frames_with_the_file)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
