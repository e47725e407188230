#!/usr/bin/env bash
# Run the test suite in the project's .venv (created or refreshed first). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
# One torch thread per process: the end-to-end tests run a server and a client side by side on
# small tensors, and oversubscribed OpenMP threads on 2 cores make them tens of times slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q "$@"
