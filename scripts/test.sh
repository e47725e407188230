#!/usr/bin/env bash
# Check the style (ruff), then run the test suite in the project's .venv (created or refreshed
# first). Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast loop (no model,
# no Blender), `bash scripts/test.sh tests/test_settings.py -k frame` runs a few tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
# Blender 4.2 LTS for the add-on tests; without it those tests are skipped (and say so).
p2v_setup_bpy42_venv || p2v_log "warning: no .venv-bpy42: the add-on tests on Blender 4.2 will be skipped"
.venv/bin/ruff format --check --quiet . || { p2v_log "error: ruff format would change the files above (run .venv/bin/ruff format .)"; exit 1; }
.venv/bin/ruff check --quiet . || { p2v_log "error: ruff check found the problems above"; exit 1; }
# One torch thread per process: the end-to-end tests run a server and a client side by side on
# small tensors, and oversubscribed OpenMP threads on 2 cores make them tens of times slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q "$@"
