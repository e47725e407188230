"""`p2v bench` runs and accounts for its time (structure only: figures live in docs/benchmarks.md)."""

from __future__ import annotations

import json

from p2v_runtime import bench
from p2v_runtime.cli import main


def test_bench_prints_where_the_time_goes(tiny_models, tmp_path, capsys):
    figures_file = tmp_path / "bench.json"
    args = ["bench", "--model", str(tiny_models["sd2-depth"]), "--frames", "2", "--steps", "2", "--size", "64"]
    assert main([*args, "--device", "cpu", "--json", str(figures_file)]) == 0
    printed = capsys.readouterr().out
    for _, label in bench.PARTS:
        assert label.strip() in printed
    figures = json.loads(figures_file.read_text())
    breakdown = figures["breakdown_seconds_per_frame"]
    assert set(breakdown) == {"plain", "first_edit", "reedit"}
    for run, parts in breakdown.items():
        assert all(value >= 0 for name, value in parts.items() if name != "other"), run
        top = sum(parts[name] for name in bench.TOP_LEVEL)
        assert abs(top + parts["other"] - parts["wall"]) < 1e-6, run
        assert parts["self_attention"] <= parts["unet_batch2"] + parts["unet_batch1"] + 1e-9
    assert breakdown["plain"]["recording"] == breakdown["plain"]["injected_kv"] == 0.0
    assert breakdown["reedit"]["unet_batch1"] == 0.0 and breakdown["first_edit"]["unet_batch1"] > 0
    assert breakdown["reedit"]["injected_kv"] > 0 and breakdown["reedit"]["vae_encoder"] == 0.0
    assert figures["reedit_unet_calls_per_frame"] == figures["plain_unet_calls_per_frame"] == 2
