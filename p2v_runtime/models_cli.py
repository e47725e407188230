"""``p2v models fetch | list | check``: the models' download as a step of its own.

``fetch`` asks the hub for the files one precision needs and their sizes, announces them, checks
the disk, then downloads into the Hugging Face cache with progress (a bar on a terminal, a line
every few seconds in a log, or with ``--json-progress`` one JSON object per line on stdout, for
the Blender add-on). Ctrl-C stops it; finished files are kept, so running it again fetches only
the rest. ``list`` shows what the cache holds; ``check`` loads each part of each model once and
says what is missing or broken. Standard library at import (torch only inside ``check``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import hub
from .errors import USER_ERRORS, ModelLoadError
from .settings import DEFAULT_CAPTIONER, DEFAULT_MODEL

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # p2v eval's default (metrics.py)


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(title="models commands", dest="models_command")

    fetch = commands.add_parser(
        "fetch",
        help="download the models an edit needs into the Hugging Face cache",
        description="Download the files the edit model and the captioner need in one precision, with sizes "
        "announced first, the disk space checked and progress shown. Ctrl-C stops; run it again to fetch the rest.",
    )
    _model_options(fetch)
    fetch.add_argument("--skip-captioner", action="store_true", help="fetch only the edit model")
    fetch.add_argument(
        "--json-progress",
        action="store_true",
        help="print one JSON object per line on stdout: plan, progress, done, interrupted or error events",
    )
    fetch.add_argument("--quiet", action="store_true", help="only errors")
    fetch.set_defaults(handler=fetch_main)

    listing = commands.add_parser("list", help="show the models in the Hugging Face cache and their sizes")
    listing.add_argument("--model", default=DEFAULT_MODEL, metavar="ID|DIR", help=f"(default: {DEFAULT_MODEL})")
    listing.add_argument(
        "--captioner", default=DEFAULT_CAPTIONER, metavar="ID|DIR", help=f"(default: {DEFAULT_CAPTIONER})"
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=list_main)

    check = commands.add_parser("check", help="load each part of the models once and report what is missing")
    _model_options(check)
    check.add_argument("--json", action="store_true", help="print JSON instead of lines")
    check.set_defaults(handler=check_main)
    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="ID|DIR", help=f"(default: {DEFAULT_MODEL})")
    parser.add_argument(
        "--captioner", default=DEFAULT_CAPTIONER, metavar="ID|DIR", help=f"(default: {DEFAULT_CAPTIONER})"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp16", "fp32"),
        help="precision of the edit model's files: auto is what an edit on --device would use (default: auto)",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"), help="(default: auto)")


def edit_dtype(dtype: str, device: str) -> str:
    """The precision an edit on ``device`` loads (models.choose_dtype), without torch when it can."""
    if device == "cpu":
        return "fp32"  # fp16 asked for on the CPU runs in fp32 (models.choose_dtype)
    if dtype != "auto":
        return dtype
    if device in ("mps",):
        return "fp32"
    if device == "cuda":
        return "fp16"
    try:
        import torch
    except ImportError:
        return "fp32"
    return "fp16" if torch.cuda.is_available() else "fp32"


# -- fetch ----------------------------------------------------------------------------------------


class _Reporter:
    """Where fetch's messages go: lines on stderr (a bar on a terminal), or JSON lines on stdout."""

    def __init__(self, json_lines: bool, quiet: bool):
        self.json_lines, self.quiet = json_lines, quiet
        self.interactive = sys.stderr.isatty() and not json_lines
        self.bar = None
        self.last = 0.0

    def event(self, kind: str, text: str | None = None, **fields) -> None:
        if self.json_lines:
            print(json.dumps({"event": kind, **fields}), flush=True)
        elif text and not self.quiet:
            print(f"p2v: {text}", file=sys.stderr, flush=True)

    def progress(self, meter: hub.ByteMeter, model: str) -> None:
        now = time.monotonic()
        finished = meter.done >= meter.total
        if self.json_lines:
            if finished or now - self.last >= 0.5:
                self.last = now
                left = meter.seconds_left
                self.event(
                    "progress",
                    model=model,
                    done=meter.done,
                    total=meter.total,
                    rate=round(meter.rate),
                    seconds_left=None if left is None else round(left, 1),
                )
            return
        if self.quiet:
            return
        if self.interactive:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(
                    total=meter.total,
                    initial=meter.done,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1000,
                    desc=" download",
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
            self.bar.update(meter.done - self.bar.n)
            return
        if finished or now - self.last >= 5:
            self.last = now
            print(f"p2v: download {meter.describe()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def fetch_main(args: argparse.Namespace) -> int:
    report = _Reporter(args.json_progress, args.quiet)
    dtype = edit_dtype(args.dtype, args.device)
    wanted = [("model", args.model, dtype)]
    if not args.skip_captioner:
        wanted.append(("captioner", args.captioner, "fp32"))
    plans: list[hub.Plan] = []
    try:
        for role, name, precision in wanted:
            plan = _plan_one(role, name, precision, report)
            if plan is not None:
                plans.append(plan)
        if not plans:
            return 0
        total = sum(p.to_download for p in plans)
        free = hub.free_bytes(plans[0].cache)
        report.event(
            "total",
            f"{human(total)} to download in all into {plans[0].cache} ({human(free)} free)",
            download_bytes=total,
            free_bytes=free,
            cache=str(plans[0].cache),
        )
        if total > free:
            raise ModelLoadError(
                f"not enough disk space: {human(total)} to download into {plans[0].cache}, {human(free)} free; "
                f"free some space or set HF_HUB_CACHE to another disk"
            )
        for plan in plans:
            _fetch_one(plan, report)
    except KeyboardInterrupt:
        report.close()
        kept = sum(1 for p in plans for f in p.files if f.cached)
        count = sum(len(p.files) for p in plans)
        report.event(
            "interrupted",
            f"interrupted; {kept} of {count} files are in the cache: run `p2v models fetch` again to fetch the rest",
            files_kept=kept,
            files=count,
        )
        if args.json_progress:  # a human reads stderr; the JSON reader has its event
            print("p2v: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        report.close()
        if args.json_progress:
            report.event("error", message=str(exc))
        print(f"p2v: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    report.close()
    return 0


def _plan_one(role: str, name: str, dtype: str, report: _Reporter) -> hub.Plan | None:
    """The plan of one model, announced; None when there is nothing to fetch (a folder)."""
    label = hub.ROLES[role][0]
    parsed = hub.parse_name(name, role)
    if parsed.folder is not None:
        status = hub.local_status(parsed.folder, dtype)
        if not status.complete:
            raise ModelLoadError(f"{label} folder {name} lacks {', '.join(status.missing)}")
        report.event(
            "plan",
            f"{label} {name} is a folder ({human(status.size)}): nothing to fetch",
            model=name,
            role=role,
            dtype=dtype,
            folder=str(parsed.folder),
            files=len(status.files),
            bytes=status.size,
            download_bytes=0,
        )
        return None
    try:
        plan = hub.plan_download(parsed, role, dtype)
    except hub.HubUnreachable:
        snapshot = hub.cached_snapshot(parsed.repo_id)
        if snapshot is None or not hub.local_status(snapshot, dtype).complete:
            raise
        report.event(
            "plan",
            f"{label} {name} ({dtype}) is in the cache; the hub is unreachable, so it was not checked for updates",
            model=name,
            role=role,
            dtype=dtype,
            folder=str(snapshot),
            files=len(hub.local_status(snapshot, dtype).files),
            bytes=hub.local_status(snapshot, dtype).size,
            download_bytes=0,
        )
        return None
    report.event(
        "plan",
        f"{label} {name} ({dtype}): {len(plan.files)} files, {human(plan.total)}; "
        + (f"{human(plan.to_download)} to download" if plan.to_download else "all in the cache"),
        model=name,
        role=role,
        dtype=dtype,
        commit=plan.commit,
        files=len(plan.files),
        bytes=plan.total,
        download_bytes=plan.to_download,
        file_sizes={f.name: f.size for f in plan.files},
    )
    return plan


def _fetch_one(plan: hub.Plan, report: _Reporter) -> None:
    meter = hub.ByteMeter(plan.total, plan.total - plan.to_download)

    def on_bytes(count: int) -> None:
        meter.advance(count)
        report.progress(meter, plan.repo_id)

    if plan.to_download:
        report.progress(meter, plan.repo_id)
    snapshot = hub.fetch(plan, on_bytes)
    report.close()
    report.event(
        "done",
        f"{plan.repo_id} ({plan.dtype}) is complete: {human(plan.total)} in {snapshot}",
        model=plan.repo_id,
        role=plan.role,
        dtype=plan.dtype,
        folder=str(snapshot),
        bytes=plan.total,
    )


def human(count: float) -> str:
    return hub.human_bytes(count)


# -- list -----------------------------------------------------------------------------------------


def list_main(args: argparse.Namespace) -> int:
    cache = hub.hub_cache_dir()
    roles = {args.model: "--model", args.captioner: "--captioner", DEFAULT_CLIP: "--clip-model"}
    repos = {r.repo_id: r for r in hub.scan_cache(cache)}
    rows = []
    for repo_id in [*[n for n in roles if n not in repos], *repos]:
        repo = repos.get(repo_id)
        row = {
            "id": repo_id,
            "role": roles.get(repo_id),
            "in_cache": repo is not None,
            "bytes": repo.size if repo else 0,
            "partial_bytes": repo.partial if repo else 0,
            "folder": str(repo.snapshot) if repo and repo.snapshot else None,
            "ready": {},
            "missing": {},
        }
        if repo and repo.snapshot:
            for dtype in ("fp16", "fp32"):
                status = hub.local_status(repo.snapshot, dtype)
                row["ready"][dtype] = status.complete
                row["missing"][dtype] = status.missing
                row.setdefault("weights", {})[dtype] = status.precisions()
        rows.append(row)
    free = hub.free_bytes(cache)
    if args.json:
        print(json.dumps({"cache": str(cache), "free_bytes": free, "models": rows}, indent=2))
        return 0
    print(f"Hugging Face cache: {cache} ({human(free)} free)")
    width = max([len(r["id"]) for r in rows] + [10])
    for row in rows:
        print(f"  {row['id']:<{width}}  {_list_state(row)}")
    if not rows:
        print("  (empty)")
    return 0


def _list_state(row: dict) -> str:
    role = f"  [{row['role']}]" if row["role"] else ""
    if not row["in_cache"]:
        return f"not in the cache: `p2v models fetch`{role}"
    size = human(row["bytes"])
    if row["partial_bytes"]:
        size += f" (+{human(row['partial_bytes'])} unfinished)"
    ready = row["ready"]
    if not ready:
        state = "no snapshot"
    elif all(ready.values()):
        kinds = {row["weights"]["fp16"], row["weights"]["fp32"]}
        state = "ready (" + " and ".join(sorted({k for kind in kinds for k in kind.split(" and ")})) + " files)"
    else:
        state = ", ".join(
            f"{d}: ready" if ok else f"{d}: lacks {', '.join(row['missing'][d])}" for d, ok in ready.items()
        )
    return f"{size:>10}  {state}{role}"


# -- check ----------------------------------------------------------------------------------------


def check_main(args: argparse.Namespace) -> int:
    dtype = edit_dtype(args.dtype, args.device)
    results = []
    for role, name, precision in (("model", args.model, dtype), ("captioner", args.captioner, "fp32")):
        results.append(_check_one(role, name, precision))
    ok = all(r["ok"] for r in results)
    if args.json:
        print(json.dumps({"ok": ok, "models": results}, indent=2))
    else:
        for result in results:
            print(f"{result['role']} {result['model']} ({result['dtype']}): {result['summary']}")
            for part in result["parts"]:
                print(f"  {part['name'] or '(model)'}: {part['state']}")
    return 0 if ok else EXIT_ERROR


def _check_one(role: str, name: str, dtype: str) -> dict:
    result = {"role": role, "model": name, "dtype": dtype, "ok": False, "folder": None, "parts": []}
    try:
        folder, status = hub.local_model(name, role, dtype, download=False)
    except USER_ERRORS as exc:
        result["summary"] = str(exc)
        parsed = _parsed_or_none(name, role)
        snapshot = hub.cached_snapshot(parsed.repo_id) if parsed is not None and parsed.repo_id else None
        if snapshot is not None:
            partial = hub.local_status(snapshot, dtype)
            result["parts"] = [{"name": m, "ok": False, "state": "missing"} for m in partial.missing]
        return result
    result["folder"] = str(folder)
    from .model_check import load_parts

    result["parts"] = load_parts(Path(folder), status, dtype)
    result["ok"] = all(p["ok"] for p in result["parts"])
    broken = [p["name"] or "(model)" for p in result["parts"] if not p["ok"]]
    result["summary"] = (
        f"ok, {human(status.size)} in {folder}" if result["ok"] else f"cannot load {', '.join(broken)} ({folder})"
    )
    return result


def _parsed_or_none(name: str, role: str):
    try:
        return hub.parse_name(name, role)
    except USER_ERRORS:
        return None
