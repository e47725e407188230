#!/usr/bin/env bash
# Run the test suite in the project's .venv (created or refreshed first). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
# Blender 4.2 LTS for the add-on tests; without it those tests are skipped (and say so).
p2v_setup_bpy42_venv || p2v_log "warning: no .venv-bpy42: the add-on tests on Blender 4.2 will be skipped"
# One torch thread per process: the end-to-end tests run a server and a client side by side on
# small tensors, and oversubscribed OpenMP threads on 2 cores make them tens of times slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q "$@"
