"""Add-on preferences: where the runtime is, default models and device, output folder, set-up."""

import glob
import os
import sys

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from . import compat, model_fetch, properties, runtime_process, runtime_setup
from ._vendor import settings as schema

PACKAGE = __package__
VENV_FOLDER = "runtime-venv"


def addon_preferences(context=None):
    """The add-on's preferences, or None when the add-on is not enabled (run from a checkout)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(PACKAGE)
    return None if addon is None else addon.preferences


def default_venv_dir() -> str:
    return os.path.join(compat.user_folder(PACKAGE), VENV_FOLDER)


def log_dir() -> str:
    return compat.user_folder(PACKAGE, "logs")


def default_runtime_python() -> str:
    """The set-up venv's Python when it exists, else nothing (the user must choose)."""
    python = runtime_process.venv_python(default_venv_dir())
    return python if os.path.isfile(python) else ""


def bundled_runtime_package() -> str:
    """What "Set up runtime" pip-installs: the wheel shipped in the extension, or this checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    wheels = sorted(glob.glob(os.path.join(here, "runtime", "*.whl")))
    if wheels:
        return f"{wheels[-1]}[runtime]"
    repo = os.path.dirname(here)
    if os.path.isfile(os.path.join(repo, "pyproject.toml")) and os.path.isdir(os.path.join(repo, "p2v_runtime")):
        return f"{repo}[runtime]"
    return "p2v-runtime[runtime]"


def read_token(prefs) -> str:
    """The remote runtime's token: the preference, else its token file, else ``$P2V_TOKEN``."""
    if prefs.token:
        return prefs.token.strip()
    if prefs.token_file:
        path = bpy.path.abspath(prefs.token_file)
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            from .errors import P2VAddonError

            why = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else (exc.strerror or exc)
            raise P2VAddonError(f"Cannot read the token file {path}: {why}") from None
    return os.environ.get("P2V_TOKEN", "").strip()


def runtime_config(prefs) -> runtime_process.RuntimeConfig:
    """The runtime to use, from the preferences (defaults when the add-on is not enabled)."""
    if prefs is None:
        return runtime_process.RuntimeConfig(python=default_runtime_python(), log_dir=log_dir())
    if prefs.runtime_mode == "REMOTE":
        return runtime_process.RuntimeConfig(
            mode="REMOTE",
            host=prefs.host.strip(),
            port=prefs.port,
            token=read_token(prefs),
            tls_ca=bpy.path.abspath(prefs.tls_ca) if prefs.tls_ca else "",
        )
    python = bpy.path.abspath(prefs.python) if prefs.python else default_runtime_python()
    return runtime_process.RuntimeConfig(python=python, idle_timeout=float(prefs.idle_timeout), log_dir=log_dir())


class P2VPreferences(bpy.types.AddonPreferences):
    bl_idname = PACKAGE

    runtime_mode: EnumProperty(
        name="Runtime",
        items=[
            ("LOCAL", "Start local runtime", "Start the runtime with a Python on this computer and keep it warm"),
            ("REMOTE", "Connect to a running runtime", "Use a `p2v serve` already running here or on another computer"),
        ],
        default="LOCAL",
    )
    python: StringProperty(
        name="Runtime Python",
        subtype="FILE_PATH",
        description="Python that has p2v_runtime installed (empty: the one made by Set up runtime)",
    )
    idle_timeout: IntProperty(
        name="Stop after idle (s)",
        default=900,
        min=30,
        description="The local runtime exits after this long without a job",
    )
    host: StringProperty(
        name="Host",
        default="127.0.0.1",
        description="The runtime's host name or address, or unix:PATH for one started with `p2v serve --unix PATH`",
    )
    port: IntProperty(name="Port", default=0, min=0, max=65535)
    token: StringProperty(
        name="Token", subtype="PASSWORD", description="The runtime's token (or use a token file, or $P2V_TOKEN)"
    )
    token_file: StringProperty(name="Token file", subtype="FILE_PATH")
    tls_ca: StringProperty(
        name="CA certificate",
        subtype="FILE_PATH",
        description="For a runtime started with --tls-cert: the CA certificate (PEM) that signed its certificate; "
        "the connection is then TLS. Empty: plain TCP (loopback, an SSH tunnel or a VPN)",
    )
    # + the edit settings the schema keeps per user (models, device, ...): added below
    output_dir: StringProperty(
        name="Output folder",
        subtype="DIR_PATH",
        default="//p2v/",
        description="Where edited frames go, a folder per result ('//' is the .blend's folder; a file never "
        "saved keeps them in the temp folder and moves them beside it when it is first saved)",
    )
    max_frames: IntProperty(
        name="Confirm above (frames)",
        default=500,
        min=1,
        description="Ask before editing a strip with more frames than this",
    )
    setup_python: StringProperty(
        name="Base Python",
        subtype="FILE_PATH",
        description="Python that makes the runtime's environment (empty: Blender's own)",
    )
    torch_index_url: StringProperty(
        name="Torch index URL",
        description="Install torch from here, e.g. a CUDA or ROCm index of pytorch.org (empty: the build "
        "for this computer: CUDA for an NVIDIA driver, ROCm where ROCm is installed, else CPU; PyPI's on macOS)",
    )
    runtime_package: StringProperty(
        name="Runtime package", description="What pip installs (empty: the runtime wheel shipped with the add-on)"
    )

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.prop(self, "runtime_mode", expand=True)
        box = layout.box()
        if self.runtime_mode == "LOCAL":
            box.prop(self, "python")
            if not self.python:
                found = default_runtime_python()
                box.label(text=f"Using {found}" if found else "No runtime yet: use Set up runtime below", icon="INFO")
            box.prop(self, "idle_timeout")
        else:
            box.prop(self, "host")
            box.prop(self, "port")
            box.prop(self, "token")
            box.prop(self, "token_file")
            box.prop(self, "tls_ca")
        row = box.row()
        row.operator("p2v.check_runtime", icon="CHECKMARK")
        row.operator("p2v.release_runtime", icon="X")
        check = runtime_setup.check_text()
        if check:
            box.label(text=check, icon="INFO")

        col = layout.column(heading="Defaults")
        for f in properties.fields(schema.PREFERENCES):
            col.prop(self, f.name)
        col.prop(self, "output_dir")
        col.prop(self, "max_frames")

        box = layout.box()
        box.label(text="Set up runtime", icon="CONSOLE")
        box.prop(self, "setup_python")
        box.prop(self, "torch_index_url")
        box.prop(self, "runtime_package")
        task = runtime_setup.current_task()
        if task is not None and task.announcement:  # which torch build, about how big: before pip starts
            box.label(text=task.announcement, icon="INFO")
        if task is not None and task.state == "running":
            compat.layout_progress(box, task.progress, f"{task.stage} ({task.step + 1}/{task.steps})")
            box.operator("p2v.cancel_setup", icon="CANCEL")
        else:
            box.operator("p2v.setup_runtime", icon="IMPORT")
        if task is not None:
            if task.message:
                box.label(text=task.message, icon="ERROR" if task.state == "failed" else "INFO")
            log = box.column(align=True)
            for line in list(task.lines)[-8:]:
                log.label(text=line[:160])
            log.label(text=f"Log: {task.log_path}")

        if self.runtime_mode == "LOCAL":
            box = layout.box()
            box.label(text="Models (downloaded once, then loaded from the cache)", icon="FILE_BLANK")
            fetch = model_fetch.current_task()
            if fetch is not None and fetch.state == "running":
                compat.layout_progress(box, fetch.progress, fetch.text)
                box.operator("p2v.cancel_fetch", icon="CANCEL")
            else:
                box.operator("p2v.fetch_models", icon="IMPORT")
            if fetch is not None and fetch.message:
                box.label(text=fetch.message, icon="ERROR" if fetch.state == "failed" else "INFO")


def base_python(prefs) -> str:
    return bpy.path.abspath(prefs.setup_python) if prefs is not None and prefs.setup_python else sys.executable


P2VPreferences.__annotations__.update(properties.annotations(schema.PREFERENCES))

CLASSES = (P2VPreferences,)
register, unregister = bpy.utils.register_classes_factory(CLASSES)
