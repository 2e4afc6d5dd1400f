from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import openapi
import pytest

from botfleet_pipeline import cli, ship
from botfleet_pipeline.client import ApiError, Server, ShipError
from botfleet_pipeline.runs import Run

PIPELINE = Path(__file__).resolve().parents[1]
SHA = "ab" * 32


def metadata_validator():
    return openapi.validator("ModelMetadata")


def metadata_for(run_dir, model, **overrides):
    args = {
        "slot": "digits",
        "name": "digits-cnn",
        "version": "20260101T000000",
        "pipeline_run": "manual__2026-01-01T00:00:00+00:00",
        "min_agreement": 0.95,
        "commit": "0" * 40,
        "source": "airflow:botfleet_train_and_ship",
        **overrides,
    }
    return ship.model_metadata(run_dir, model, **args)


def test_upload_metadata_fits_the_servers_openapi_schema(run_dir, ptq, qat):
    validator = metadata_validator()
    for model in (ptq["model"], qat["model"], Run(run_dir).float_model):
        metadata = metadata_for(run_dir, model)
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(metadata)]
        assert not errors, errors
    # Without the on-device accuracy gate, too.
    assert validator.is_valid(metadata_for(run_dir, ptq["model"], min_agreement=None))


def test_the_schema_check_refuses_what_the_server_refuses():
    validator = metadata_validator()
    ok = {"slot": "digits", "name": "digits-cnn", "version": "1.0.0"}
    assert validator.is_valid(ok)
    assert not validator.is_valid({**ok, "dag": "botfleet_train_and_ship"})
    assert not validator.is_valid({**ok, "version": "1.0 beta"})
    assert not validator.is_valid({**ok, "quantization": "int4"})
    assert not validator.is_valid({**ok, "engines": {"candidates": ["no-such-engine"]}})
    # What the DAG used to send (HTTP 400): a gate and a provenance member the server
    # does not know.
    assert not validator.is_valid({**ok, "gate": {"max_p99_ms": 25.0, "max_regression_percent": 20.0}})
    assert not validator.is_valid({**ok, "provenance": {"pipeline_run": "r", "dag": "train_and_ship"}})


def test_metadata_carries_provenance_and_the_accuracy_gate(run_dir, ptq):
    metrics = Run(run_dir).metrics()
    metadata = metadata_for(run_dir, ptq["model"])
    assert metadata["quantization"] == "int8_qdq"
    assert metadata["evaluation"] == {"metric": "top1_agreement", "min_agreement": 0.95}
    assert metadata["gate"] == ship.DEFAULT_GATE
    assert metadata["provenance"] == {
        "pipeline_run": "manual__2026-01-01T00:00:00+00:00",
        "dataset": metrics["dataset"]["digest"],
        "commit": "0" * 40,
        "source": "airflow:botfleet_train_and_ship",
        "parent_sha256": metrics["onnx_sha256"],
        "metrics": {
            "accuracy": ptq["accuracy"],
            "float_accuracy": metrics["accuracy"],
            "top1_agreement": ptq["top1_agreement"],
            "eval_count": 360,
        },
    }
    float_metadata = metadata_for(run_dir, Run(run_dir).float_model, min_agreement=None)
    assert float_metadata["quantization"] == "fp32"
    assert "parent_sha256" not in float_metadata["provenance"]
    assert "evaluation" not in float_metadata


def test_figures_travel_only_with_the_bytes_they_were_measured_on(run_dir, ptq, tmp_path):
    model = Path(ptq["model"])
    copy = tmp_path / model.name
    shutil.copy(model, copy)
    shutil.copy(model.with_suffix(".json"), copy.with_suffix(".json"))
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(ShipError, match="SHA-256"):
        ship.measurements(run_dir, copy)


def _files(tmp_path):
    model = tmp_path / "model.int8.onnx"
    model.write_bytes(b"\x08\x0a" * 5000)
    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text('{"schema":1}\n')
    return model, evaluation


def test_register_sends_metadata_model_and_evaluation_set(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("BOTFLEET_TOKEN", "operator-token-0123456789")
    model, evaluation = _files(tmp_path)
    metadata = {"slot": "digits", "name": "m", "version": "1.0.0", "evaluation": {"min_agreement": 0.9}}
    record = ship.register(Server.at(fake.url), model, metadata, evaluation)
    assert record["sha256"] == ship.sha256_file(model)
    (upload,) = fake.seen
    assert upload.headers["Authorization"] == "Bearer operator-token-0123456789"
    parts = upload.parts()
    assert set(parts) == {"metadata", "model", "evaluation"}
    assert json.loads(parts["metadata"]) == metadata
    assert parts["model"] == model.read_bytes()
    assert parts["evaluation"] == evaluation.read_bytes()


def test_register_sends_the_evaluation_set_exactly_with_its_gate(fake, tmp_path):
    model, evaluation = _files(tmp_path)
    with pytest.raises(ShipError, match="exactly"):
        ship.register(Server.at(fake.url), model, {"slot": "s", "name": "m", "version": "1"}, evaluation)
    with pytest.raises(ShipError, match="exactly"):
        ship.register(Server.at(fake.url), model, {"evaluation": {}, "slot": "s"}, None)
    assert fake.seen == []


def test_register_refuses_a_record_of_other_bytes(fake, tmp_path):
    fake.record_sha256 = SHA
    model, _ = _files(tmp_path)
    with pytest.raises(ShipError, match="not the uploaded bytes"):
        ship.register(Server.at(fake.url), model, {"slot": "s", "name": "m", "version": "1"})


def test_server_errors_carry_the_servers_message(fake):
    with pytest.raises(ApiError, match="HTTP 404: no route GET /nowhere") as err:
        Server.at(fake.url).get("/nowhere")
    assert not err.value.transient


def test_rollout_sends_the_idempotency_key_and_the_bytes_as_a_precondition(fake):
    fake.rollout_sha256 = SHA
    created = ship.start_rollout(
        Server.at(fake.url),
        slot="digits",
        version="1.0.0",
        sha256=SHA,
        idempotency_key="manual__2026-01-01T00:00:00+00:00",
        selector="site=lab",
        strategy={"waves": [{"percent": 100}]},
    )
    assert created == {"rollout_id": "r-1", "devices": ["robot-1"], "sha256": SHA}
    post = fake.seen[0]
    assert post.headers["Idempotency-Key"] == "manual__2026-01-01T00:00:00+00:00"
    assert post.json() == {
        "slot": "digits",
        "version": "1.0.0",
        "sha256": SHA,
        "selector": "site=lab",
        "strategy": {"waves": [{"percent": 100}]},
    }
    assert not openapi.errors("RolloutRequest", post.json())
    # The version has other bytes: the server refuses before making a rollout, and the
    # step fails with its answer, having asked nothing else.
    fake.rollout_sha256 = "cd" * 32
    fake.seen.clear()
    with pytest.raises(ApiError, match="HTTP 409: registered with SHA-256 cdcd") as err:
        ship.start_rollout(
            Server.at(fake.url),
            slot="digits",
            version="1.0.0",
            sha256=SHA,
            idempotency_key="k",
            devices=["r"],
        )
    assert not err.value.transient
    assert [(s.method, s.path) for s in fake.seen] == [("POST", "/api/v1/rollouts")]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _wait(fake, timeout_s=60.0):
    clock = Clock()
    return ship.wait_for_rollout(
        Server.at(fake.url), "r-1", timeout_s=timeout_s, poll_s=2.0, clock=clock, sleep=clock.sleep
    )


def test_wait_returns_when_the_fleet_took_the_model(fake):
    active = {"robot-1": {"outcome": "active", "history": [], "wave": 0}}
    fake.views = [fake.view("in_progress"), fake.view("in_progress"), fake.view("completed", active)]
    assert _wait(fake)["state"] == "completed"
    assert len(fake.seen) == 3


def test_wait_fails_with_each_devices_reason_when_the_robots_refused(fake):
    reason = "accuracy gate: top-1 agreement 0.619 on 64 samples is below 0.95 (tract)"
    devices = {
        "robot-1": {"outcome": "rejected", "reason": reason, "history": [], "wave": 0},
        "robot-2": {"outcome": "active", "history": [], "wave": 0},
    }
    fake.views = [fake.view("rolled_back", devices, reason="wave 0: 1 of 2 devices failed")]
    with pytest.raises(ship.RolloutFailed) as err:
        _wait(fake)
    message = str(err.value)
    assert "rolled_back: wave 0: 1 of 2 devices failed" in message
    assert f"robot-1: rejected: {reason}" in message
    assert "robot-2" not in message
    assert err.value.rollout["state"] == "rolled_back"


@pytest.mark.parametrize("state", ["paused", "aborted", "superseded"])
def test_wait_fails_on_every_state_but_completed(fake, state):
    fake.views = [fake.view(state, reason=f"{state} by an operator")]
    with pytest.raises(ship.RolloutFailed, match=state):
        _wait(fake)


def test_a_completed_rollout_with_no_device_serving_is_a_failure(fake):
    skipped = {"robot-1": {"outcome": "skipped", "reason": "offline", "history": [], "wave": 0}}
    fake.views = [fake.view("completed", skipped)]
    with pytest.raises(ship.RolloutFailed, match="robot-1: skipped: offline"):
        _wait(fake)


def test_wait_gives_up_at_the_deadline(fake):
    with pytest.raises(ship.RolloutTimeout, match="no verdict after 10 s; rollout r-1 in progress"):
        _wait(fake, timeout_s=10.0)
    # Polled every 2 s within 10 s, and once at the deadline.
    assert len(fake.seen) == 6


def test_wait_asks_again_while_the_server_is_failing(fake):
    active = {"robot-1": {"outcome": "active", "history": [], "wave": 0}}
    fake.views = [503, 502, fake.view("completed", active)]
    assert _wait(fake)["state"] == "completed"


def test_wait_gives_up_on_an_unknown_rollout(fake):
    with pytest.raises(ApiError, match="404"):
        ship.wait_for_rollout(Server.at(fake.url), "r-404", timeout_s=5.0)


def test_cli_rollout_waits_and_exits_1_with_the_robots_reason(fake, capsys):
    fake.rollout_sha256 = SHA
    reason = "accuracy gate: top-1 agreement 0.619 on 64 samples is below 0.95 (tract)"
    devices = {"robot-1": {"outcome": "rejected", "reason": reason, "history": [], "wave": 0}}
    fake.views = [fake.view("in_progress"), fake.view("in_progress"), fake.view("rolled_back", devices)]
    argv = ["rollout", "--server", fake.url, "--slot", "digits", "--version", "1.0.0", "--sha256", SHA]
    argv += ["--selector", "site=lab", "--idempotency-key", "run-1", "--poll", "0.01", "--timeout", "30"]
    assert cli.main(argv) == 1
    assert reason in capsys.readouterr().err

    active = {"robot-1": {"outcome": "active", "history": [], "wave": 0}}
    fake.views = [fake.view("completed", active)]
    fake.seen.clear()
    assert cli.main(["wait", "--server", fake.url, "r-1"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "completed"


def test_cli_register_uploads_a_run(fake, run_dir, ptq, tmp_path, capsys):
    from botfleet_pipeline import evaluate

    evaluation = tmp_path / "evaluation.json"
    evaluate.export_gate(run_dir, evaluation)
    argv = ["register", "--server", fake.url, "--run", str(run_dir), "--model", ptq["model"]]
    argv += ["--evaluation", str(evaluation), "--min-agreement", "0.95", "--slot", "digits"]
    argv += ["--name", "digits-cnn", "--version", "1.0.0", "--pipeline-run", "run-1"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == ptq["sha256"]
    parts = fake.seen[0].parts()
    assert json.loads(parts["metadata"])["provenance"]["pipeline_run"] == "run-1"
    assert parts["evaluation"] == evaluation.read_bytes()


def test_the_ship_step_imports_no_ml_library():
    # An Airflow worker runs register/start_rollout/wait_for_rollout without torch or onnx.
    code = (
        "import sys, botfleet_pipeline.ship, botfleet_pipeline.cli; "
        "heavy = {'torch', 'onnx', 'onnxruntime', 'numpy', 'sklearn', 'requests'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PIPELINE, check=True)
