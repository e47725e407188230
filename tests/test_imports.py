"""Starting the CLI, and what the add-on vendors, must not import torch (seconds on every start)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def modules_after(code: str) -> set[str]:
    check = (
        f"import sys\n{code}\nprint(' '.join(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_light_modules_do_not_import_torch():
    code = (
        "import p2v_runtime, p2v_runtime.protocol, p2v_runtime.settings, p2v_runtime.client, p2v_runtime.cli, "
        "p2v_runtime.hub, p2v_runtime.models_cli"
    )
    assert modules_after(code) == set()


def test_building_the_cli_parser_does_not_import_torch():
    assert modules_after("import p2v_runtime.cli\np2v_runtime.cli.build_parser()") == set()


def test_the_pool_side_of_the_server_does_not_import_torch():
    """``p2v serve --ray``: only the actors compute; the server process stays light."""
    import pytest

    pytest.importorskip("ray")
    assert modules_after("import p2v_runtime.pool.pool, p2v_runtime.server.cli") == set()
