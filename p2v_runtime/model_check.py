"""``p2v models check``: load each part of a model once, by the class its files name, and say how it went.

A part that fails is named with the loader's first line, so a truncated download, a missing
tokenizer file or a precision without weights is found before a job starts. Parts are loaded on
the CPU one at a time and dropped again.
"""

from __future__ import annotations

import gc
import importlib
import json
import warnings
from pathlib import Path

import torch

from . import hub


def load_parts(folder: Path, status: hub.LocalStatus, dtype: str) -> list[dict]:
    """One entry per part: ``{"name", "ok", "state"}``; a pipeline's parts are its components."""
    model_index = _json(folder / "model_index.json")
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    hub_quiet()
    if model_index is not None:
        parts = []
        for component, class_name in hub.pipeline_components(model_index).items():
            library = model_index[component][0]
            parts.append(
                _try(
                    component,
                    status,
                    lambda c=component, lib=library, cls=class_name: _load_component(
                        folder, c, lib, cls, status, torch_dtype
                    ),
                )
            )
        return parts
    architecture = ((_json(folder / "config.json") or {}).get("architectures") or ["AutoModel"])[0]
    return [
        _try("", status, lambda: _load_transformers_model(folder, architecture)),
        _try("processor", status, lambda: _load_processor(folder)),
    ]


def hub_quiet() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def _try(name: str, status: hub.LocalStatus, load) -> dict:
    weights = status.weights.get(name, [])
    size = sum(status.files.get(f"{name}/{w}" if name else w, 0) for w in weights)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load()
    except Exception as exc:  # noqa: BLE001 - reported, not raised: check goes on to the other parts
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {"name": name, "ok": False, "state": f"cannot load: {reason[:300]}"}
    what = type(loaded).__name__
    del loaded
    gc.collect()
    detail = f", {hub.human_bytes(size)} in {', '.join(weights)}" if weights else ""
    return {"name": name, "ok": True, "state": f"ok ({what}{detail})"}


def _load_component(folder: Path, component: str, library: str, class_name: str, status, torch_dtype):
    if component == "feature_extractor":  # loaded as the editor loads it (models._from_pretrained_depth)
        from transformers import DPTImageProcessor

        return DPTImageProcessor.from_pretrained(folder, subfolder=component)
    cls = getattr(importlib.import_module(library), class_name)
    if component not in status.weights:  # tokenizer, scheduler: configuration only
        return cls.from_pretrained(folder, subfolder=component)
    variant = "fp16" if any(".fp16." in n for n in status.weights[component]) else None
    return cls.from_pretrained(folder, subfolder=component, torch_dtype=torch_dtype, variant=variant)


def _load_transformers_model(folder: Path, architecture: str):
    import transformers

    cls = getattr(transformers, architecture, None) or transformers.AutoModel
    return cls.from_pretrained(folder)


def _load_processor(folder: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
