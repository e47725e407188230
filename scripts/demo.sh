#!/usr/bin/env bash
# End-to-end demo: render a short clip with bpy (frames + true Z pass), edit it with `p2v edit`,
# and write a side-by-side preview (source | edit).
#
#   scripts/demo.sh [--prompt P] [--frames N] [--tiny] [-- EXTRA P2V EDIT OPTIONS]
#
# Uses the real models (stable-diffusion-2-depth, BLIP) when the model hub answers. When it does
# not (or HF_HUB_OFFLINE is set, or --tiny is given) it says so in one line and runs the same
# chain on tiny random-weight models, so the demo always runs; that preview is labelled
# "random-weight output", since it is noise, not an edit. Everything goes to out/demo/; the clip
# and the tiny models are reused when already there. Idempotent: run it as often as you like.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

demo_error() { printf 'p2v demo: error: %s\n' "$*" >&2; exit 1; }

prompt="a shiny blue sports car on a snowy road"
frames=12
force_tiny=0
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --prompt) [ $# -ge 2 ] || demo_error "--prompt needs a value"; prompt="$2"; shift 2 ;;
        --prompt=*) prompt="${1#--prompt=}"; shift ;;
        --frames) [ $# -ge 2 ] || demo_error "--frames needs a value"; frames="$2"; shift 2 ;;
        --frames=*) frames="${1#--frames=}"; shift ;;
        --tiny) force_tiny=1; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) demo_error "unknown argument '$1' (usage: scripts/demo.sh [--prompt P] [--frames N] [--tiny] [-- P2V EDIT OPTIONS])" ;;
    esac
done
[[ "$frames" =~ ^[0-9]+$ ]] && [ "$frames" -ge 1 ] && [ "$frames" -le 500 ] \
    || demo_error "--frames must be a whole number from 1 to 500, got '$frames'"
[ -n "${prompt//[[:space:]]/}" ] || demo_error "--prompt is empty"

source scripts/_venv.sh
PY=.venv/bin/python
P2V=.venv/bin/p2v
# Two cores shared with everything else: more torch threads than cores only slows the edit down.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

DEMO=out/demo
CLIP=$DEMO/clip
EDIT=$DEMO/edit
DEPTH_USED=$DEMO/depth-used
STATS=$DEMO/stats.json
VIDEO=$DEMO/side_by_side.mp4
TINY=$DEMO/tiny-models
mkdir -p "$DEMO"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# 1. The clip, rendered by this project (reused when already rendered with the same parameters).
t0=$(now)
"$PY" scripts/render_demo_clip.py "$CLIP" --frames "$frames" --reuse \
    || demo_error "rendering the demo clip into $CLIP failed (see above)"
render_s=$(elapsed "$t0")

# 2. Real models if the hub answers, else the tiny random-weight ones.
hub="${HF_ENDPOINT:-https://huggingface.co}"
why_offline="model hub $hub unreachable"
hub_reachable() {
    case "${HF_HUB_OFFLINE:-}" in
        1|[Tt][Rr][Uu][Ee]|[Yy][Ee][Ss]|[Oo][Nn]) why_offline="HF_HUB_OFFLINE is set"; return 1 ;;
    esac
    "$PY" - "$hub" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
request = urllib.request.Request(sys.argv[1], method="HEAD")
try:
    urllib.request.urlopen(request, timeout=5).close()
except urllib.error.HTTPError:
    pass  # it answered: reachable, whatever the status
EOF
}

models=()
label=""
if [ "$force_tiny" = 0 ] && hub_reachable; then
    mode="real models"
    echo "p2v demo: model hub reachable; editing with the real models (first run downloads several GB)"
else
    mode="tiny random-weight models"
    if [ "$force_tiny" = 1 ]; then
        echo "p2v demo: --tiny given; running the chain on tiny random-weight models (output is noise, not an edit)"
    else
        echo "p2v demo: $why_offline; running the same chain on tiny random-weight models (output is noise, not an edit)"
    fi
    want=$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
        p2v_runtime/tiny_models.py)
    if [ "$(cat "$TINY/.p2v-demo-stamp" 2>/dev/null || true)" != "$want" ]; then
        rm -f "$TINY/.p2v-demo-stamp"
        "$P2V" make-tiny-models "$TINY" >/dev/null || demo_error "building the tiny models in $TINY failed (see above)"
        echo "$want" >"$TINY/.p2v-demo-stamp"
    fi
    models=(--model "$TINY/sd2-depth" --captioner "$TINY/blip" --size 256 --steps 20)
    label="random-weight output"
fi

# 3. The edit. Earlier results go first, so a shorter clip leaves no stale frames behind.
rm -rf "$EDIT" "$DEPTH_USED" "$STATS" "$VIDEO"
t0=$(now)
"$P2V" edit "$CLIP/frames" --depth "$CLIP/depth" --prompt "$prompt" --out "$EDIT" --overwrite \
    --stats "$STATS" --save-depth "$DEPTH_USED" --cache-dir "$DEMO/inversion-cache" \
    ${models[@]+"${models[@]}"} ${extra[@]+"${extra[@]}"} \
    || demo_error "p2v edit failed (see above)"
edit_s=$(elapsed "$t0")

# 4. The preview: source on the left, edit on the right.
"$PY" - "$CLIP" "$EDIT" "$VIDEO" "$label" <<'EOF' || demo_error "writing the preview $VIDEO failed (see above)"
import json, sys
from pathlib import Path

from p2v_runtime.errors import P2VError
from p2v_runtime.frames import open_frames, write_side_by_side_mp4

clip, edit, video, label = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
fps = json.loads((clip / "clip.json").read_text()).get("fps", 12)
try:
    with open_frames(clip / "frames") as source:
        write_side_by_side_mp4(source, edit, video, fps=fps, label=label or None)
except P2VError as exc:
    sys.exit(f"p2v demo: error: {exc}")
EOF

echo "p2v demo: done with $mode (render ${render_s} s, edit ${edit_s} s): clip $CLIP/frames (depth $CLIP/depth)," \
     "edit $EDIT, depth used $DEPTH_USED, stats $STATS, preview $VIDEO"
