#!/usr/bin/env bash
# Run the test suite in the project's .venv (created or refreshed first). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
exec .venv/bin/python -m pytest -q "$@"
