"""`p2v ablate`: one clip edited with the paper's ablation variants, scored side by side.

The variants form a ladder from a per-frame edit to the full method, one change a rung, so each
metric's movement can be read against the change that caused it (docs/algorithm.md, section 5;
the paper's evaluation table has a "without update" row, its Figure 5 the random earlier frame;
``--seed`` picks those frames):

===================  ===============  =========  ==============================================
variant              injection        update     what it shows
===================  ===============  =========  ==============================================
per-frame            none             off        each frame edited on its own (the baseline)
anchor-only          anchor           off        attention to the first frame only
previous-only        previous         off        attention to the previous frame only
anchor-random        anchor+random    off        the anchor and a random earlier frame (Figure 5)
no-update            anchor+previous  off        the paper's attention, no guided update
pix2video            anchor+previous  x0         the full method (official code's update)
autograd-update      anchor+previous  autograd   the update taken through the UNet instead
===================  ===============  =========  ==============================================

Every variant uses the same prompts and settings otherwise. Inversion does not depend on
injection or update, so all variants share one inversion cache and one source prompt (the first
variant's caption, when none is given): only the first variant inverts, the others hit the cache.

Outputs under ``DIR``: ``<variant>/000000.png ...`` (each variant's frames, at the input size),
``ablation.json`` and ``ablation.md`` (the table, with per-frame values in the JSON),
``contact_sheet.png`` (rows: the source and each variant; columns: sampled frames) and
``pixel_mse.png`` (per-frame Pixel-MSE of each variant, matplotlib's Agg renderer through a
``Figure`` object, so no global pyplot state and no display are needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import settings as settings_module
from .errors import InputError
from .files import atomic_write, atomic_write_text

EXIT_INTERRUPTED = 130
VARIANT_SETTINGS = ("injection", "update")  # each variant sets these


@dataclass(frozen=True)
class Variant:
    name: str
    injection: str
    update: str
    description: str


VARIANTS = (
    Variant("per-frame", "none", "off", "each frame edited on its own"),
    Variant("anchor-only", "anchor", "off", "attention to the first frame only"),
    Variant("previous-only", "previous", "off", "attention to the previous frame only"),
    Variant("anchor-random", "anchor+random", "off", "attention to the anchor and a random earlier frame"),
    Variant("no-update", "anchor+previous", "off", "anchor + previous, no guided update"),
    Variant("pix2video", "anchor+previous", "x0", "the full method (x0 update)"),
    Variant("autograd-update", "anchor+previous", "autograd", "full method, update through the UNet"),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
OUTPUT_FILES = ("ablation.json", "ablation.md", "contact_sheet.png", "pixel_mse.png")


def variants_named(spec: str | None) -> list[Variant]:
    """The variants a comma-separated ``--variants`` list names, in the ladder's order."""
    if not spec:
        return list(VARIANTS)
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in VARIANT_NAMES]
    if unknown or not wanted:
        raise InputError(
            f"--variants: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(VARIANT_NAMES)}"
        )
    return [v for v in VARIANTS if v.name in wanted]


# --------------------------------------------------------------------------------------------
# running the variants


def run_ablation(
    frames,
    settings,
    out_dir: Path,
    *,
    variants: Sequence[Variant] = VARIANTS,
    depth=None,
    clip_model: str,
    flow: str = "dis",
    eval_device: str | None = None,
    columns: int = 6,
    progress_for: Callable[[Variant], Callable] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict:
    """Edit ``frames`` once per variant into ``out_dir/<variant>/``, score each, write the reports.

    Returns what ``ablation.json`` holds.
    """
    from .editor import edit_clip
    from .frames import open_frames, write_frame
    from .metrics import evaluate_clip
    from .protocol import EditStats

    settings.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    source_prompt = settings.source_prompt
    rows = []
    for number, variant in enumerate(variants, 1):
        variant_settings = dataclasses.replace(
            settings, injection=variant.injection, update=variant.update, source_prompt=source_prompt
        ).validate()
        folder = out_dir / variant.name
        _clear_frames(folder)
        folder.mkdir(parents=True, exist_ok=True)
        log(
            f"variant {number}/{len(variants)}: {variant.name} (injection {variant.injection}, update {variant.update})"
        )
        stats = EditStats()
        progress = progress_for(variant) if progress_for else None
        try:
            for index, rgb in edit_clip(frames, variant_settings, depth=depth, progress=progress, stats=stats):
                write_frame(folder, index, rgb)
        finally:
            if progress is not None and hasattr(progress, "close"):
                progress.close()
        source_prompt = stats.source_prompt  # later variants reuse it: same cache keys, no captioner
        scores = evaluate_clip(
            frames,
            open_frames(folder),
            settings.prompt,
            clip_model=clip_model,
            device=eval_device or settings.device,
            flow=flow,
        )
        rows.append(
            {
                "name": variant.name,
                "injection": variant.injection,
                "update": variant.update,
                "description": variant.description,
                "folder": variant.name,
                "metrics": scores.summary(),
                "per_frame": scores.per_frame,
                "valid_fraction": scores.valid_fraction,
                "stats": stats.to_dict(),
            }
        )
        log(
            f"  {_metrics_line(scores.summary())}; {stats.seconds:.1f} s, "
            f"{stats.inversion_cache_hits}/{stats.frames} inversion(s) from the cache"
        )
    report = {
        "input": getattr(frames, "description", "clip"),
        "frames": len(frames),
        "size": list(frames.size),
        "prompt": settings.prompt,
        "source_prompt": source_prompt,
        "clip_model": clip_model,
        "flow": flow,
        "settings": {k: v for k, v in settings.to_wire().items() if k not in VARIANT_SETTINGS},
        "variants": rows,
    }
    write_reports(out_dir, report, frames, columns)
    return report


def _clear_frames(folder: Path) -> None:
    """Remove the frames of an earlier run (only NNNNNN.png), so the count always matches."""
    from .frames import existing_frames

    if folder.is_dir():
        for path in existing_frames(folder):
            path.unlink()


def _metrics_line(summary: dict) -> str:
    from .metrics import format_number

    return (
        f"CLIP-Text {format_number(summary['clip_text'], 4)}, CLIP-Image {format_number(summary['clip_image'], 4)}, "
        f"Pixel-MSE {format_number(summary['pixel_mse'], 2)}"
    )


# --------------------------------------------------------------------------------------------
# reports: table, contact sheet, plot


def write_reports(out_dir: Path, report: dict, frames, columns: int = 6) -> None:
    from PIL import Image

    atomic_write_text(out_dir / "ablation.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "ablation.md", markdown_table(report))
    sheet = Image.fromarray(contact_sheet(frames, out_dir, report, columns))
    atomic_write(out_dir / "contact_sheet.png", lambda file: sheet.save(file, format="PNG"))
    pixel_mse_plot(report, out_dir / "pixel_mse.png")


def markdown_table(report: dict) -> str:
    """The ablation table in Markdown, the paper's three metrics plus what each variant cost."""
    from .metrics import format_number

    lines = [
        f"# Ablation: {report['input']}",
        "",
        f'Prompt: "{report["prompt"]}"; source prompt: "{report["source_prompt"]}"; '
        f"{report['frames']} frame(s) at {report['size'][0]}x{report['size'][1]}; "
        f"steps {report['settings']['steps']}, size {report['settings']['size']}; "
        f"CLIP {report['clip_model']}; flow {report['flow']}.",
        "",
        "| variant | injection | update | CLIP-Text | CLIP-Image | Pixel-MSE | s/frame | cached inversions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["variants"]:
        m, s = row["metrics"], row["stats"]
        per_frame = s.get("seconds_per_frame")
        lines.append(
            f"| {row['name']} | {row['injection']} | {row['update']} | {format_number(m['clip_text'], 4)} | "
            f"{format_number(m['clip_image'], 4)} | {format_number(m['pixel_mse'], 2)} | "
            f"{format_number(per_frame, 2)} | {s['inversion_cache_hits']}/{s['frames']} |"
        )
    lines += ["", "Higher CLIP-Text and CLIP-Image are better; lower Pixel-MSE is better (0..255 pixel values).", ""]
    return "\n".join(lines)


def sampled_columns(count: int, columns: int) -> list[int]:
    """Up to ``columns`` frame indices spread evenly over the clip, first and last included."""
    if count <= 0:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, count - 1, max(1, min(columns, count)))})


def contact_sheet(frames, out_dir: Path, report: dict, columns: int = 6, cell_height: int = 128) -> np.ndarray:
    """Rows: the source, then each variant; columns: sampled frames; labels on the left and top."""
    from PIL import Image, ImageDraw

    from .frames import open_frames, resize_rgb

    indices = sampled_columns(len(frames), columns)
    width, height = frames.size
    cell_h = min(cell_height, height)
    cell_w = max(1, round(width * cell_h / height))
    names = ["source"] + [row["name"] for row in report["variants"]]
    font = _font(14)
    label_w = 12 + max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font) for n in names)
    label_w, header_h, gap = int(label_w), 24, 2
    sheet = Image.new(
        "RGB", (label_w + len(indices) * (cell_w + gap), header_h + len(names) * (cell_h + gap)), (24, 24, 24)
    )
    draw = ImageDraw.Draw(sheet)
    for column, index in enumerate(indices):
        draw.text((label_w + column * (cell_w + gap) + 4, 4), f"frame {index}", fill=(230, 230, 230), font=font)
    sources = [frames] + [open_frames(out_dir / row["folder"]) for row in report["variants"]]
    for row, (name, clip) in enumerate(zip(names, sources)):
        top = header_h + row * (cell_h + gap)
        draw.text((6, top + cell_h // 2 - 8), name, fill=(230, 230, 230), font=font)
        for column, index in enumerate(indices):
            thumb = resize_rgb(clip.read(index), (cell_w, cell_h))
            sheet.paste(Image.fromarray(thumb), (label_w + column * (cell_w + gap), top))
    return np.asarray(sheet)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def pixel_mse_plot(report: dict, path: Path) -> Path:
    """Per-frame Pixel-MSE of each variant (frame i+1 against frame i warped onto it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    plotted = False
    markers = "osD^vx*"
    for number, row in enumerate(report["variants"]):
        values = [np.nan if v is None else v for v in row["per_frame"]["pixel_mse"]]
        if values:
            axes.plot(
                range(1, len(values) + 1),
                values,
                marker=markers[number % len(markers)],
                markersize=4,
                linewidth=1.2,
                label=row["name"],
            )
            plotted = True
    axes.set_xlabel("frame (compared with the previous frame warped onto it)")
    axes.set_ylabel("Pixel-MSE (0..255 values)")
    axes.set_title(f'Pixel-MSE per frame: {Path(str(report["input"])).name}, "{report["prompt"]}"', fontsize=10)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    if plotted:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, "one frame: no consecutive pairs", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    return atomic_write(path, lambda file: figure.savefig(file, format="png"))


# --------------------------------------------------------------------------------------------
# p2v ablate


def add_ablate_arguments(parser: argparse.ArgumentParser) -> None:
    from .metrics import DEFAULT_CLIP_MODEL, DEFAULT_FLOW, FLOW_METHODS

    parser.add_argument("input", help="folder of frames or a video file")
    parser.add_argument("--out", required=True, help="folder for the variants' frames and the reports")
    settings_module.add_arguments(
        parser, "cli", exclude=VARIANT_SETTINGS, default_note="injection and update are set per variant"
    )
    for name in VARIANT_SETTINGS:  # taken only to be refused with a reason
        parser.add_argument(settings_module.flag(name), dest=name, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--depth", metavar="DIR", help="Z pass per frame (EXR or .npy) instead of estimated depth")
    parser.add_argument(
        "--variants", metavar="LIST", help=f"comma-separated subset of {','.join(VARIANT_NAMES)} (default: all)"
    )
    parser.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help=f"id or folder (default {DEFAULT_CLIP_MODEL})")
    parser.add_argument("--flow", default=DEFAULT_FLOW, choices=FLOW_METHODS, help="optical flow for Pixel-MSE")
    parser.add_argument("--columns", type=int, default=6, help="frames shown per row of the contact sheet")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier ablation in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def ablate_main(args: argparse.Namespace) -> int:
    from .frames import open_depth, open_frames
    from .progress import ProgressBars

    for name in VARIANT_SETTINGS:
        if getattr(args, name) is not None:
            raise InputError(
                f"p2v ablate sets {settings_module.flag(name)} per variant; leave it out "
                "(choose variants with --variants)"
            )
    settings = settings_module.from_arguments(args, "cli", exclude=VARIANT_SETTINGS)
    variants = variants_named(args.variants)
    if args.columns < 1:
        raise InputError(f"--columns must be at least 1, got {args.columns}")
    frames = open_frames(args.input, settings.frames)
    out_dir = _checked_output_dir(args, variants)
    depth = open_depth(args.depth, len(frames), frames.size, settings.frames) if args.depth else None
    log = (lambda line: None) if args.quiet else (lambda line: print(f"p2v: {line}", file=sys.stderr))
    progress_for = None if args.quiet else (lambda variant: ProgressBars(steps=settings.steps))
    try:
        report = run_ablation(
            frames,
            settings,
            out_dir,
            variants=variants,
            depth=depth,
            clip_model=args.clip_model,
            flow=args.flow,
            columns=args.columns,
            progress_for=progress_for,
            log=log,
        )
    except KeyboardInterrupt:
        print(f"p2v: interrupted; finished variants are kept in {out_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summary_table(report))
    if not args.quiet:
        print(f"p2v: reports written to {out_dir} ({', '.join(OUTPUT_FILES)})", file=sys.stderr)
    return 0


def summary_table(report: dict) -> str:
    """The table printed at the end, aligned for a terminal."""
    from .metrics import format_number

    header = f"{'variant':<16} {'injection':<16} {'update':<9} {'CLIP-Text':>9} {'CLIP-Image':>10} {'Pixel-MSE':>10}"
    lines = [header]
    for row in report["variants"]:
        m = row["metrics"]
        lines.append(
            f"{row['name']:<16} {row['injection']:<16} {row['update']:<9} {format_number(m['clip_text'], 4):>9} "
            f"{format_number(m['clip_image'], 4):>10} {format_number(m['pixel_mse'], 2):>10}"
        )
    return "\n".join(lines)


def _checked_output_dir(args: argparse.Namespace, variants: Sequence[Variant]) -> Path:
    """Refuse to write into the input, or over an earlier ablation without --overwrite."""
    from .frames import existing_frames

    out_dir = Path(args.out).expanduser().resolve()
    source = Path(args.input).expanduser().resolve()
    if out_dir == source or (source.is_dir() and source in out_dir.parents):
        raise InputError(
            f"--out {args.out} is inside the input folder; choose another folder so the source stays intact"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {args.out} exists and is not a folder")
    if args.depth and Path(args.depth).expanduser().resolve() == out_dir:
        raise InputError(f"--out {args.out} is also the depth folder; choose another folder")
    earlier = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    earlier += [v.name for v in VARIANTS if (out_dir / v.name).is_dir() and existing_frames(out_dir / v.name)]
    if earlier and not args.overwrite:
        raise InputError(
            f"--out {args.out} already holds an ablation ({', '.join(earlier[:4])}); "
            "pass --overwrite or choose another folder"
        )
    if args.overwrite:
        chosen = {v.name for v in variants}
        for v in VARIANTS:  # variants not rerun would sit beside the new report; drop their frames
            if v.name not in chosen:
                _clear_frames(out_dir / v.name)
    return out_dir
