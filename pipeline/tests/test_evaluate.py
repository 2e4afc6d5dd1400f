from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openapi
import pytest

from botfleet_pipeline import cli, evaluate
from botfleet_pipeline.runs import Run

PIPELINE = Path(__file__).resolve().parents[1]


def test_evaluation_set_has_exactly_the_contracts_members(run_dir, tmp_path):
    gate_path = tmp_path / "gate.json"
    info = evaluate.export_gate(run_dir, gate_path)
    assert info["samples"] == 64
    assert gate_path.stat().st_size < 100_000

    # The evaluation-set contract (schema 1): the server refuses any other member.
    gate = json.loads(gate_path.read_text())
    run = Run(run_dir)
    assert set(gate) == {"schema", "input", "output", "shape", "parent_sha256", "dataset_digest", "samples"}
    assert gate["schema"] == 1
    assert gate["input"] == "x"
    assert gate["output"] == "logits"
    assert gate["shape"] == [1, 1, 8, 8]
    assert gate["parent_sha256"] == run.metrics()["onnx_sha256"]
    assert gate["dataset_digest"] == run.metrics()["dataset"]["digest"]
    for sample in gate["samples"]:
        assert set(sample) == {"data", "top1", "output"}
        assert len(sample["data"]) == 64
        assert isinstance(sample["top1"], int)
        assert 0 <= sample["top1"] < 10
        assert len(sample["output"]) == 10
        assert all(isinstance(v, float) for v in sample["data"] + sample["output"])

    # The server's OpenAPI document describes the same file.
    assert not openapi.errors("EvaluationSet", gate)

    # What evaluate reads back is exactly the first 64 held-out inputs and the float
    # model's answers on them.
    ds = run.dataset()
    x, top1, outputs = evaluate.load_gate(gate_path)
    np.testing.assert_array_equal(x, ds.x_eval[:64])
    parent = evaluate.logits(run.float_model, ds.x_eval[:64])
    np.testing.assert_array_equal(top1, parent.argmax(axis=1))
    np.testing.assert_allclose(outputs, parent, atol=1e-4)
    assert evaluate.evaluate_gate(run.float_model, gate_path)["top1_agreement"] == 1.0


@pytest.mark.parametrize("count", [0, 361, 4097])
def test_evaluation_set_size_is_bounded(run_dir, tmp_path, count):
    # 1 to 4096 samples by the contract, and no more than the run's 360 held-out ones.
    with pytest.raises(ValueError, match="samples"):
        evaluate.export_gate(run_dir, tmp_path / "gate.json", count=count)
    assert not (tmp_path / "gate.json").exists()


def test_evaluation_set_of_every_held_out_sample(run_dir, tmp_path):
    info = evaluate.export_gate(run_dir, tmp_path / "gate.json", count=360)
    assert info["samples"] == 360
    assert info["bytes"] < evaluate.MAX_GATE_BYTES


def test_an_evaluation_set_of_another_schema_is_refused(run_dir, tmp_path):
    gate_path = tmp_path / "gate.json"
    evaluate.export_gate(run_dir, gate_path, count=2)
    gate = json.loads(gate_path.read_text())
    gate_path.write_text(json.dumps({**gate, "schema": 2}))
    with pytest.raises(ValueError, match="schema"):
        evaluate.load_gate(gate_path)


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


def test_cli_report_has_every_held_out_top1(run_dir, ptq, tmp_path, capsys):
    report = tmp_path / "report.json"
    gate = tmp_path / "gate.json"
    argv = ["evaluate", "--run", str(run_dir), "--model", ptq["model"], "--export-gate", str(gate)]
    assert cli.main([*argv, "--gate", str(gate), "--report", str(report)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(report.read_text())
    assert "top1" not in printed
    assert {k: v for k, v in written.items() if k != "top1"} == printed
    ds = Run(run_dir).dataset()
    expected = evaluate.logits(ptq["model"], ds.x_eval).argmax(axis=1)
    assert written["top1"] == expected.tolist()
    assert written["gate"]["samples"] == 64


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
