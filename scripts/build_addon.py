#!/usr/bin/env python3
"""Build the Blender add-on: vendor the settings schema, wire protocol and client, package it.

    python scripts/build_addon.py                 # dist/pix2video-<version>.zip (extension)
                                                  # dist/pix2video-<version>-legacy.zip (add-on folder)
    python scripts/build_addon.py --vendor-only   # just refresh blender_addon/_vendor/

The settings schema, the protocol and the client have one source each, ``p2v_runtime/settings.py``,
``protocol.py`` and ``client.py`` (standard library only); the add-on runs in Blender's own Python,
where ``p2v_runtime`` is not installed, so this script copies them byte for byte into
``blender_addon/_vendor/`` (git-ignored; tests call :func:`vendor` too and fail when a copy
differs). The packages also carry a wheel of the runtime (pure Python, built here without network
or build tools) that the add-on's "Set up runtime" button installs into the runtime's own
virtual environment, never into Blender's Python.

Standard library only, any Python 3.11+.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import re
import sys
import zipfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
ADDON_DIR = REPO / "blender_addon"
RUNTIME_DIR = REPO / "p2v_runtime"
VENDORED = ("settings.py", "protocol.py", "client.py")
VENDOR_INIT = '''"""Copies of p2v_runtime/settings.py, protocol.py and client.py, written by scripts/build_addon.py.

Do not edit: change the originals in p2v_runtime/ and run the build script again.
"""
'''
LEGACY_FOLDER = "pix2video"
# Fixed timestamp for zip entries, so the same sources give the same bytes.
ZIP_DATE = (2024, 1, 1, 0, 0, 0)
_EXCLUDED_PARTS = {"__pycache__", ".gitignore", ".DS_Store"}


def vendor(addon_dir: Path = ADDON_DIR) -> list[Path]:
    """Write ``_vendor/`` (protocol, client, __init__) into ``addon_dir``; return the files changed."""
    target = addon_dir / "_vendor"
    target.mkdir(parents=True, exist_ok=True)
    wanted = {name: (RUNTIME_DIR / name).read_bytes() for name in VENDORED}
    wanted["__init__.py"] = VENDOR_INIT.encode("utf-8")
    changed = []
    for name, data in wanted.items():
        path = target / name
        if not path.exists() or path.read_bytes() != data:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            changed.append(path)
    return changed


def vendored_differences(addon_dir: Path = ADDON_DIR) -> list[str]:
    """Names of vendored files that are missing or differ from their source in p2v_runtime/."""
    target = addon_dir / "_vendor"
    return [
        name
        for name in VENDORED
        if not (target / name).exists() or (target / name).read_bytes() != (RUNTIME_DIR / name).read_bytes()
    ]


def manifest() -> dict:
    return tomllib.loads((ADDON_DIR / "blender_manifest.toml").read_text(encoding="utf-8"))


# --- the runtime wheel -------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
    return f"sha256={digest}"


def runtime_wheel() -> tuple[str, bytes]:
    """(file name, bytes) of a pure-Python wheel of ``p2v_runtime`` with its extras and entry point.

    Written directly (a wheel is a zip with a ``.dist-info`` folder), so building the add-on needs
    neither network nor ``build``/``setuptools``.
    """
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    name, version = project["name"], project["version"]
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        f"Summary: {project.get('description', '')}",
        f"Requires-Python: {project.get('requires-python', '>=3.10')}",
    ]
    lines += [f"Requires-Dist: {req}" for req in project.get("dependencies", [])]
    for extra, reqs in sorted(project.get("optional-dependencies", {}).items()):
        lines.append(f"Provides-Extra: {extra}")
        lines += [f'Requires-Dist: {req}; extra == "{extra}"' for req in reqs]
    files: dict[str, bytes] = {}
    for path in sorted(RUNTIME_DIR.rglob("*.py")):  # subpackages too (p2v_runtime/server/)
        files[f"p2v_runtime/{path.relative_to(RUNTIME_DIR).as_posix()}"] = path.read_bytes()
    files[f"{info}/METADATA"] = ("\n".join(lines) + "\n").encode("utf-8")
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: p2v build_addon.py\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    scripts = project.get("scripts", {})
    if scripts:
        entry = "[console_scripts]\n" + "".join(f"{key} = {value}\n" for key, value in scripts.items())
        files[f"{info}/entry_points.txt"] = entry.encode("utf-8")
    files[f"{info}/top_level.txt"] = b"p2v_runtime\n"
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    record += f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode("utf-8")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(_zip_info(path), data)
    return f"{dist}-{version}-py3-none-any.whl", buffer.getvalue()


# --- the packages ------------------------------------------------------------------------------


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def addon_files(addon_dir: Path = ADDON_DIR) -> list[tuple[str, Path]]:
    """(path inside the package, source file) of everything the add-on ships, vendored copies included."""
    entries = []
    for path in sorted(addon_dir.rglob("*")):
        rel = path.relative_to(addon_dir)
        if path.is_dir() or _EXCLUDED_PARTS.intersection(rel.parts) or path.suffix in (".pyc", ".tmp"):
            continue
        if rel.parts[0] == "runtime":  # a wheel left in the source folder is not shipped twice
            continue
        entries.append((rel.as_posix(), path))
    return entries


def build(out_dir: Path, *, with_wheel: bool = True) -> dict[str, Path]:
    """Vendor, then write the extension zip and the legacy add-on zip into ``out_dir``."""
    vendor()
    meta = manifest()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = addon_files()
    wheel = runtime_wheel() if with_wheel else None
    outputs = {
        "extension": out_dir / f"{meta['id']}-{meta['version']}.zip",
        "legacy": out_dir / f"{meta['id']}-{meta['version']}-legacy.zip",
    }
    for kind, path in outputs.items():
        prefix = "" if kind == "extension" else f"{LEGACY_FOLDER}/"
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, source in files:
                archive.writestr(_zip_info(prefix + name), source.read_bytes())
            if wheel is not None:
                archive.writestr(_zip_info(f"{prefix}runtime/{wheel[0]}"), wheel[1])
        os.replace(tmp, path)
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Vendor the protocol into the Blender add-on and package it.")
    parser.add_argument("--out", default=str(REPO / "dist"), help="output folder (default dist/)")
    parser.add_argument("--vendor-only", action="store_true", help="only refresh blender_addon/_vendor/")
    parser.add_argument("--no-wheel", action="store_true", help="leave the runtime wheel out of the packages")
    args = parser.parse_args(argv)
    changed = vendor()
    for path in changed:
        print(f"vendored {path.relative_to(REPO)}")
    if args.vendor_only:
        return 0
    outputs = build(Path(args.out), with_wheel=not args.no_wheel)
    for kind, path in outputs.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
