"""The ``p2v`` command: edit, eval, ablate, serve, ping, make-tiny-models (and the benchmarks' entry points).

Every failure a user can cause ends in one line ``p2v: error: ...`` and a non-zero exit code;
nothing already written (input, earlier frames) is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

from . import settings as settings_module
from .errors import EditCancelled, P2VError
from .settings import EditSettings

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    # The libraries' own notices (torchvision fallbacks, prompt truncation) are not the user's
    # business; errors still show. Set before transformers/diffusers configure their loggers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.handler(args)
    except P2VError as exc:
        print(f"p2v: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2v", description="Pix2Video video editing (ICCV 2023) runtime")
    commands = parser.add_subparsers(title="commands")

    edit = commands.add_parser("edit", help="edit a clip (folder of images or a video file)")
    edit.add_argument("input", help="folder of frames (png/jpg/...) or a video file")
    edit.add_argument("--out", required=True, help="folder for the edited frames 000000.png, ...")
    add_edit_arguments(edit)
    edit.add_argument("--frames", metavar="A:B", help="edit frames A..B-1 only (0-based)")
    edit.add_argument("--depth", metavar="DIR", help="Z pass per frame (EXR or .npy) instead of estimated depth")
    edit.add_argument("--save-depth", metavar="DIR", help="write the normalised depth actually used (16-bit PNG)")
    edit.add_argument("--stats", metavar="FILE", help="write the edit's statistics as JSON")
    edit.add_argument("--overwrite", action="store_true", help="replace frames already in --out")
    edit.add_argument("--server", metavar="HOST:PORT", help="run the edit on a running `p2v serve`")
    edit.add_argument("--quiet", action="store_true", help="no progress bars")
    edit.set_defaults(handler=edit_main)

    tiny = commands.add_parser("make-tiny-models", help="write tiny random-weight models for tests")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--full-size", action="store_true",
                      help="instead write DIR/sd2-depth-full: SD 2 depth's full-size architecture with random "
                           "weights in fp16 (about 2.6 GB), for GPU benchmarks")
    tiny.set_defaults(handler=make_tiny_models_main)

    from . import bench

    bench_parser = commands.add_parser("bench", help="time this edit against plain depth-to-image")
    bench.add_bench_arguments(bench_parser)
    bench_parser.set_defaults(handler=bench.bench_main)

    from . import ablation, metrics  # light: their torch/OpenCV imports happen inside the handlers

    evaluate = commands.add_parser("eval", help="the paper's metrics of an edit: CLIP-Text, CLIP-Image, Pixel-MSE")
    metrics.add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=metrics.eval_main)

    ablate = commands.add_parser("ablate", help="edit one clip with the paper's ablation variants and compare them")
    ablation.add_ablate_arguments(ablate)
    ablate.set_defaults(handler=ablation.ablate_main)

    from . import client, server

    serve = commands.add_parser("serve", help="run the sidecar runtime server")
    server.add_serve_arguments(serve)
    serve.set_defaults(handler=server.serve_main)

    ping = commands.add_parser("ping", help="check that a runtime server answers")
    client.add_ping_arguments(ping)
    ping.set_defaults(handler=client.ping_main)
    return parser


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of one edit; shared by ``p2v edit`` and the benchmark scripts."""
    d = EditSettings()
    parser.add_argument("--prompt", required=True, help="what the clip should become")
    parser.add_argument("--source-prompt", help="describes the input (default: BLIP caption of frame 1)")
    parser.add_argument("--model", default=d.model, help=f"id or folder (default {d.model})")
    parser.add_argument("--captioner", default=d.captioner, help=f"id or folder (default {d.captioner})")
    parser.add_argument("--device", default=d.device, choices=settings_module.DEVICES)
    parser.add_argument("--dtype", default=d.dtype, choices=settings_module.DTYPES)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--guidance", type=float, default=d.guidance)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--injection", default=d.injection, choices=settings_module.INJECTION_MODES)
    parser.add_argument("--layers", default=d.layers, choices=settings_module.LAYER_SETS)
    parser.add_argument("--update", default=d.update, choices=settings_module.UPDATE_MODES)
    parser.add_argument("--update-delta", type=float, default=d.update_delta)
    parser.add_argument("--update-steps", type=int, default=d.update_steps,
                        help="last step index of the guided update, counted on 50 steps (scaled with --steps)")
    parser.add_argument("--size", type=int, default=d.size, help="long side of the working size (multiple of 64)")
    parser.add_argument("--depth-norm", default=d.depth_norm, choices=settings_module.DEPTH_NORMS)
    parser.add_argument("--cache-dir", help="inversion cache folder (default: the user cache folder)")


def settings_from_args(args: argparse.Namespace) -> EditSettings:
    return EditSettings(
        prompt=args.prompt,
        source_prompt=args.source_prompt,
        model=args.model,
        captioner=args.captioner,
        device=args.device,
        dtype=args.dtype,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        injection=args.injection,
        layers=args.layers,
        update=args.update,
        update_delta=args.update_delta,
        update_steps=args.update_steps,
        size=args.size,
        depth_norm=args.depth_norm,
        cache_dir=args.cache_dir,
    ).validate()


def edit_main(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .frames import open_depth, open_frames, write_frame

    settings = settings_from_args(args)
    if args.server and args.save_depth:
        raise InputError("--save-depth writes on the machine that edits; it is not available with --server")
    frames = open_frames(args.input, args.frames)
    out_dir = _checked_output_dir(args, frames)
    depth = open_depth(args.depth, len(frames), frames.size, args.frames) if args.depth else None
    progress = ProgressBars(enabled=not args.quiet, steps=settings.steps)
    cancel = threading.Event()
    written = 0
    stats = None
    try:
        if args.server:
            from .client import edit_on_server

            results = edit_on_server(args.server, frames, settings, depth=depth, progress=progress, cancel=cancel,
                                     warn=progress.warn)
        else:
            from .editor import EditStats, edit_clip

            stats = EditStats()
            results = edit_clip(
                frames, settings, depth=depth, progress=progress, cancel=cancel, stats=stats,
                save_depth_dir=args.save_depth, warn=progress.warn,
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        for index, rgb in results:
            write_frame(out_dir, index, rgb)
            written += 1
    except KeyboardInterrupt:
        cancel.set()
        progress.close()
        print(f"p2v: interrupted; {written} frame(s) kept in {out_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EditCancelled:
        progress.close()
        print(f"p2v: cancelled; {written} frame(s) kept in {out_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except P2VError as exc:
        progress.close()
        kept = f" ({written} frame(s) kept in {out_dir})" if written else ""
        print(f"p2v: error: {exc}{kept}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        progress.close()
    stats_dict = stats.to_dict() if stats is not None else (results.stats or {})
    if args.stats:
        Path(args.stats).write_text(json.dumps(stats_dict, indent=2) + "\n", encoding="utf-8")
    if not args.quiet:
        print(f"p2v: {written} frame(s) written to {out_dir}", file=sys.stderr)
    return 0


def _checked_output_dir(args: argparse.Namespace, frames) -> Path:
    """Refuse outputs that would write over the input or over earlier results."""
    from .errors import InputError
    from .frames import existing_frames

    out_dir = Path(args.out).expanduser().resolve()
    source = Path(args.input).expanduser().resolve()
    if out_dir == source:
        raise InputError(f"--out {args.out} is the input folder; choose another folder so the source frames stay intact")
    for depth_dir in (args.depth, args.save_depth):
        if depth_dir and Path(depth_dir).expanduser().resolve() == out_dir:
            raise InputError(f"--out {args.out} is also a depth folder; choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {args.out} exists and is not a folder")
    already = existing_frames(out_dir) if out_dir.is_dir() else []
    if already and not args.overwrite:
        raise InputError(
            f"--out {args.out} already holds {len(already)} frame(s); pass --overwrite or choose another folder"
        )
    if out_dir.is_dir() and not os.access(out_dir, os.W_OK):
        raise InputError(f"--out {args.out} is not writable")
    return out_dir


class ProgressBars:
    """Progress on stderr: a tqdm bar per stage on a terminal, plain lines in logs.

    Inversion and edit alternate per frame, so each stage keeps its own bar. When stderr is not
    a terminal (a farm log, a pipe), bars would be noise: one line per stage start and per
    finished frame instead.
    """

    def __init__(self, enabled: bool = True, steps: int = 1):
        self.enabled = enabled
        self.steps = steps
        self.interactive = sys.stderr.isatty()
        self.bars: dict = {}
        self.printed: dict = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if not self.interactive:
            self._line(stage, done, total)
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            unit = "step" if stage in ("inversion", "edit") else "it"
            bar = tqdm(total=total, desc=f"{stage:>9}", unit=unit, file=sys.stderr, position=len(self.bars),
                       dynamic_ncols=True)
            self.bars[stage] = bar
        bar.n = done
        bar.refresh()

    def _line(self, stage: str, done: int, total: int) -> None:
        per_frame = self.steps if stage in ("inversion", "edit") else 1
        if done % per_frame:
            return
        finished = done // per_frame
        if self.printed.get(stage) == finished:
            return
        self.printed[stage] = finished
        if finished == 0:
            print(f"p2v: {stage}...", file=sys.stderr, flush=True)
        elif stage in ("depth", "inversion", "edit"):
            print(f"p2v: {stage} {finished}/{total // per_frame} frames", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"p2v: warning: {message}", file=sys.stderr)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars = {}


def make_tiny_models_main(args: argparse.Namespace) -> int:
    from .tiny_models import write_full_size_sd2_depth, write_tiny_models

    if args.full_size:
        print(f"sd2-depth-full: {write_full_size_sd2_depth(args.dir, seed=args.seed)}")
        return 0
    paths = write_tiny_models(args.dir, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
