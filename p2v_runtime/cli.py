"""The ``p2v`` command: edit, batch, eval, ablate, serve, ping, models, make-tiny-models (and benchmarks).

Every failure a user can cause ends in one line ``p2v: error: ...`` and a non-zero exit code;
nothing already written (input, earlier frames) is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

from . import settings as settings_module
from .errors import USER_ERRORS, EditCancelled
from .files import atomic_write_text
from .progress import ProgressBars
from .protocol import EditStats

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
    except USER_ERRORS as exc:
        print(f"p2v: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2v", description="Pix2Video video editing (ICCV 2023) runtime", allow_abbrev=False
    )
    # No abbreviated options: --update would silently mean --update-delta once a setting is added.
    commands = parser.add_subparsers(title="commands", parser_class=_Parser)

    edit = commands.add_parser("edit", help="edit a clip (folder of images or a video file)")
    edit.add_argument("input", help="folder of frames (png/jpg/...) or a video file")
    edit.add_argument("--out", required=True, help="folder for the edited frames 000000.png, ...")
    settings_module.add_arguments(edit, "cli")
    edit.add_argument("--depth", metavar="DIR", help="Z pass per frame (EXR or .npy) instead of estimated depth")
    edit.add_argument("--save-depth", metavar="DIR", help="write the normalised depth actually used (16-bit PNG)")
    edit.add_argument("--stats", metavar="FILE", help="write the edit's statistics as JSON")
    edit.add_argument("--overwrite", action="store_true", help="replace frames already in --out")
    edit.add_argument(
        "--server", metavar="HOST:PORT", help="run the edit on a running `p2v serve` (or unix:PATH for its --unix)"
    )
    edit.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="with --server: connect with TLS, trusting the runtime's certificate by this CA (PEM)",
    )
    edit.add_argument(
        "--preview",
        action="store_true",
        help="edit the anchor (--anchor: the first frame of --frames by default) only, to judge a look in "
        "seconds: it is what the whole edit will make of that frame, and its inversion is cached for it",
    )
    edit.add_argument("--quiet", action="store_true", help="no progress bars")
    edit.set_defaults(handler=edit_main)

    from . import batch

    many = commands.add_parser(
        "batch",
        help="edit many clips from a TOML or JSON file, here or as jobs on a `p2v serve`",
        description="Each clip of FILE is edited as `p2v edit` edits one; see README, 'Many shots'. Exit status: "
        "0 all done, 1 some failed (the others are done), 2 a bad file or arguments (nothing started), "
        "130 cancelled (frames already written stay).",
    )
    batch.add_batch_arguments(many)

    from . import models_cli

    models = commands.add_parser(
        "models", help="fetch, list and check the models in the Hugging Face cache (the first run's download)"
    )
    models_cli.add_models_arguments(models)

    tiny = commands.add_parser(
        "make-tiny-models",
        help="write random-weight models in the real layouts, for tests and benchmarks",
        description="By default DIR/sd2-depth, DIR/blip and DIR/clip: tiny stand-ins (seconds a clip on a CPU).",
    )
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    kind = tiny.add_mutually_exclusive_group()
    kind.add_argument(
        "--replica",
        action="store_true",
        help="instead write DIR/sd2-depth, DIR/blip-base and DIR/blip-large from the real checkpoints' "
        "configuration files (fp32 files and fp16 variants, .bin where the real repository has only .bin), "
        "only widths and depths shrunk (about 150 MB)",
    )
    kind.add_argument(
        "--full-size",
        action="store_true",
        help="instead write DIR/sd2-depth-full: SD 2 depth at its published sizes, DPT-Hybrid included, "
        "random weights as fp16 variant files (about 2.6 GB), for GPU benchmarks",
    )
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


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def edit_main(args: argparse.Namespace) -> int:
    from .frames import depth_png_writer, open_depth, open_frames
    from .outputs import OutputFolder, checked_output_dir

    settings = settings_module.from_arguments(args, "cli")
    frames = open_frames(args.input, settings.frames)
    out = OutputFolder(
        checked_output_dir(
            args.out,
            args.input,
            what=f"--out {args.out}",
            depth_dirs=(args.depth, args.save_depth),
            overwrite=args.overwrite,
        ),
        f"--out {args.out}",
    )
    out_dir = out.folder
    depth = open_depth(args.depth, len(frames), frames.size, settings.frames) if args.depth else None
    progress = ProgressBars(enabled=not args.quiet, steps=settings.steps)
    cancel = threading.Event()
    depth_sink = depth_png_writer(args.save_depth) if args.save_depth else None
    stats = EditStats()  # filled the same way by a local edit and by a server
    try:
        options = dict(
            depth=depth,
            progress=progress,
            cancel=cancel,
            stats=stats,
            depth_sink=depth_sink,
            warn=progress.warn,
            preview=args.preview,
        )
        if args.server:
            from .client import edit_on_server

            results = edit_on_server(args.server, frames, settings, tls_ca=args.tls_ca, **options)
        else:
            from .editor import edit_clip

            results = edit_clip(frames, settings, **options)
        out.make()
        for index, rgb in results:
            out.write(index, rgb)
    except KeyboardInterrupt:
        cancel.set()
        progress.close()
        print(f"p2v: interrupted; {out.written} frame(s) kept in {out_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EditCancelled:
        progress.close()
        print(f"p2v: cancelled; {out.written} frame(s) kept in {out_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        progress.close()
        kept = f" ({out.written} frame(s) kept in {out_dir})" if out.written else ""
        print(f"p2v: error: {exc}{kept}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        progress.close()
    if args.stats:
        try:
            atomic_write_text(args.stats, json.dumps(stats.to_dict(), indent=2) + "\n")
        except OSError as exc:
            print(f"p2v: error: cannot write --stats {args.stats}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_ERROR
    if not args.quiet:
        print(f"p2v: {out.written} frame(s) written to {out_dir}", file=sys.stderr)
    return 0


def make_tiny_models_main(args: argparse.Namespace) -> int:
    if args.full_size:
        from .replica_models import write_full_size_replica

        print(f"sd2-depth-full: {write_full_size_replica(args.dir, seed=args.seed)}")
        return 0
    if args.replica:
        from .replica_models import write_replicas

        paths = write_replicas(args.dir, seed=args.seed)
    else:
        from .tiny_models import write_tiny_models

        paths = write_tiny_models(args.dir, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
