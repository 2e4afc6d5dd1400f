from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from botfleet_pipeline import cli, evaluate
from botfleet_pipeline.runs import Run

PIPELINE = Path(__file__).resolve().parents[1]


def test_gate_export_is_small_and_reads_back(run_dir, tmp_path):
    gate_path = tmp_path / "gate.json"
    info = evaluate.export_gate(run_dir, gate_path)
    assert info["samples"] == 64
    assert gate_path.stat().st_size < 100_000

    gate = json.loads(gate_path.read_text())
    assert gate["input"] == "x"
    assert gate["shape"] == [1, 1, 8, 8]
    assert gate["metric"] == "top1_agreement"
    assert gate["parent_sha256"] == Run(run_dir).metrics()["onnx_sha256"]
    assert all(len(s["data"]) == 64 and len(s["logits"]) == 10 for s in gate["samples"])

    # What evaluate reads back is exactly the first 64 held-out inputs and the float
    # model's answers on them.
    ds = Run(run_dir).dataset()
    x, top1, logits = evaluate.load_gate(gate_path)
    np.testing.assert_array_equal(x, ds.x_eval[:64])
    parent = evaluate.logits(Run(run_dir).float_model, ds.x_eval[:64])
    np.testing.assert_array_equal(top1, parent.argmax(axis=1))
    np.testing.assert_allclose(logits, parent, atol=1e-4)
    assert evaluate.evaluate_gate(Run(run_dir).float_model, gate_path)["top1_agreement"] == 1.0


def test_gate_agreement_matches_the_held_out_measurement(run_dir, broken, tmp_path):
    gate_path = tmp_path / "gate.json"
    evaluate.export_gate(run_dir, gate_path)
    ds = Run(run_dir).dataset()
    pred = evaluate.logits(broken["model"], ds.x_eval[:64]).argmax(axis=1)
    parent = evaluate.logits(Run(run_dir).float_model, ds.x_eval[:64]).argmax(axis=1)
    measured = evaluate.evaluate_gate(broken["model"], gate_path)["top1_agreement"]
    assert measured == float(np.mean(pred == parent))
    assert measured < 0.9


def test_cli_min_agreement_gates(run_dir, broken, tmp_path, capsys):
    gate = tmp_path / "gate.json"
    assert cli.main(["evaluate", "--run", str(run_dir), "--export-gate", str(gate)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top1_agreement"] == 1.0
    assert out["exported_gate"]["samples"] == 64
    argv = ["evaluate", "--run", str(run_dir), "--model", broken["model"], "--gate", str(gate)]
    assert cli.main([*argv, "--min-agreement", "0.95"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["top1_agreement"] == broken["top1_agreement"]


def test_module_entry_point(run_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "botfleet_pipeline", "evaluate", "--run", str(run_dir)],
        cwd=PIPELINE,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout)
    assert result["accuracy"] == Run(run_dir).metrics()["accuracy"]
