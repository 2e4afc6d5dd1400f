"""Ship step: register a model with botfleet-server, roll it out, wait for the fleet.

- :func:`model_metadata` builds the upload's ``metadata`` from a run directory: slot,
  name, version, quantization, the robots' benchmark gate, provenance (pipeline run, data
  set digest, commit, the float parent's SHA-256, the accuracy figures measured here) and
  the on-device accuracy gate (``evaluation``: metric and minimum agreement).
- :func:`register` uploads model, metadata and evaluation set (``POST /api/v1/models``);
  the server checks, signs and stores them. The same slot, version and bytes again
  answer the same record, so a retry is safe.
- :func:`start_rollout` asks for a rollout of that slot and version on the condition
  that the version is the uploaded bytes (``sha256``: the server refuses another with
  HTTP 409 before it records anything), with an ``Idempotency-Key`` (a retry answers the
  rollout the first try made).
- :func:`wait_for_rollout` polls ``GET /api/v1/rollouts/{id}`` until the fleet's verdict,
  within a deadline, and raises :class:`RolloutFailed` with each device's reason when the
  robots rejected the model or it was rolled back.

Standard library only (an Airflow worker imports this without torch or onnx).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .client import ApiError, Multipart, Part, Server, ShipError

log = logging.getLogger(__name__)

METRIC = "top1_agreement"
# The robots' benchmark gate (protocol `Gate`): timed runs and a p99 budget.
DEFAULT_GATE = {"warmup_runs": 3, "runs": 20, "max_p99_ms": 25.0}
POLL_S = 2.0


class RolloutFailed(ShipError):
    """The fleet did not take the model; ``rollout`` is the server's last view of it."""

    def __init__(self, message: str, rollout: dict) -> None:
        super().__init__(message)
        self.rollout = rollout


class RolloutTimeout(ShipError):
    """No verdict within the deadline; ``rollout`` is the last view seen (None if none)."""

    def __init__(self, message: str, rollout: dict | None) -> None:
        super().__init__(message)
        self.rollout = rollout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def measurements(run_dir: Path, model_path: Path) -> dict:
    """What the pipeline measured for ``model_path``: the quantize step's
    ``<model>.json`` for a variant, ``metrics.json`` for the run's float model.

    The recorded SHA-256 must be the file's: the figures travel with the bytes they
    were measured on, or not at all.
    """
    run_dir, model_path = Path(run_dir), Path(model_path)
    metrics = _read_json(run_dir / "metrics.json")
    sha256 = sha256_file(model_path)
    if model_path.resolve() == (run_dir / "model.onnx").resolve():
        measured = {
            "sha256": metrics["onnx_sha256"],
            "quantization": "fp32",
            "accuracy": metrics["accuracy"],
            "float_accuracy": metrics["accuracy"],
            "top1_agreement": 1.0,
            "eval_count": metrics["eval_count"],
            "parent_sha256": None,
        }
    else:
        variant = _read_json(model_path.with_suffix(".json"))
        measured = {
            "sha256": variant["sha256"],
            # Both PTQ and QAT variants are QuantizeLinear/DequantizeLinear graphs.
            "quantization": "int8_qdq",
            "accuracy": variant["accuracy"],
            "float_accuracy": variant["float_accuracy"],
            "top1_agreement": variant["top1_agreement"],
            "eval_count": variant["eval_count"],
            "parent_sha256": variant["parent_sha256"],
        }
        if variant["parent_sha256"] != metrics["onnx_sha256"]:
            raise ShipError(f"{model_path} was measured against another float model than {run_dir}'s")
    if measured["sha256"] != sha256:
        raise ShipError(
            f"{model_path} has SHA-256 {sha256}, but its measurements are of {measured['sha256']}"
        )
    measured["dataset_digest"] = metrics["dataset"]["digest"]
    measured["snapshot"] = metrics["dataset"].get("snapshot")
    return measured


def model_metadata(
    run_dir: Path,
    model_path: Path,
    *,
    slot: str,
    name: str,
    version: str,
    pipeline_run: str,
    min_agreement: float | None,
    gate: dict | None = None,
    commit: str | None = None,
    source: str | None = None,
) -> dict:
    """The upload's ``metadata`` for ``model_path`` of the run in ``run_dir``.

    ``min_agreement`` is the on-device accuracy gate: the share of the evaluation set's
    samples whose top-1 must equal the float parent's (None: no evaluation set is sent).
    """
    measured = measurements(run_dir, model_path)
    provenance: dict[str, Any] = {
        "pipeline_run": pipeline_run,
        "dataset": measured["dataset_digest"],
        "metrics": {
            "accuracy": measured["accuracy"],
            "float_accuracy": measured["float_accuracy"],
            "top1_agreement": measured["top1_agreement"],
            "eval_count": measured["eval_count"],
        },
    }
    snapshot = measured["snapshot"]
    if snapshot is not None:
        # Trained on a botfleet-server data set as well: the model names that snapshot (its
        # manifest digest) and how many of its samples it learned from, how many of them
        # labelled with the fleet's own answers.
        provenance["dataset"] = f"sha256:{snapshot['digest']}"
        provenance["metrics"]["dataset_samples"] = snapshot["used"]
        provenance["metrics"]["dataset_pseudo_labelled"] = snapshot["labelled"].get("pseudo", 0)
    if measured["parent_sha256"] is not None:
        provenance["parent_sha256"] = measured["parent_sha256"]
    if commit:
        provenance["commit"] = commit
    if source:
        provenance["source"] = source
    metadata: dict[str, Any] = {
        "slot": slot,
        "name": name,
        "version": version,
        "quantization": measured["quantization"],
        "gate": dict(DEFAULT_GATE if gate is None else gate),
        "provenance": provenance,
    }
    if min_agreement is not None:
        metadata["evaluation"] = {"metric": METRIC, "min_agreement": min_agreement}
    return metadata


def register(server: Server, model_path: Path, metadata: dict, evaluation: Path | None = None) -> dict:
    """Uploads the model (and its evaluation set); returns the server's model record."""
    model_path = Path(model_path)
    if ("evaluation" in metadata) != (evaluation is not None):
        raise ShipError("send the evaluation set exactly when the metadata has `evaluation`")
    parts = [
        Part("metadata", "application/json", data=json.dumps(metadata).encode()),
        Part("model", "application/octet-stream", path=model_path, filename=model_path.name),
    ]
    if evaluation is not None:
        parts.append(
            Part("evaluation", "application/json", path=Path(evaluation), filename="evaluation.json")
        )
    status, record = server.request("POST", "/api/v1/models", multipart=Multipart(parts))
    sha256 = sha256_file(model_path)
    if not isinstance(record, dict) or record.get("sha256") != sha256:
        raise ShipError(f"the server recorded {record!r}, not the uploaded bytes (SHA-256 {sha256})")
    log.info(
        "registered %s %s release %s sha256 %s (%s)",
        record["slot"],
        record["version"],
        record.get("release"),
        sha256,
        "new" if status == 201 else "uploaded before",
    )
    return record


def start_rollout(
    server: Server,
    *,
    slot: str,
    version: str,
    sha256: str,
    idempotency_key: str,
    selector: str | None = None,
    devices: list[str] | None = None,
    strategy: dict | None = None,
    supersede: bool = False,
) -> dict:
    """Starts the rollout of ``slot``/``version`` if that version is ``sha256``.

    The API names a model by slot and version; the request's ``sha256`` makes the
    uploaded bytes a precondition, so a version registered with other bytes is refused
    (HTTP 409, an :class:`ApiError`) before any robot is commanded.
    Returns ``{"rollout_id", "devices", "sha256"}``.
    """
    if (selector is None) == (devices is None):
        raise ShipError("pass exactly one of selector and devices")
    body: dict[str, Any] = {"slot": slot, "version": version, "sha256": sha256}
    if selector is not None:
        body["selector"] = selector
    else:
        body["devices"] = list(devices)
    if strategy is not None:
        body["strategy"] = strategy
    if supersede:
        body["supersede"] = True
    _, created = server.request(
        "POST", "/api/v1/rollouts", json_body=body, headers={"Idempotency-Key": idempotency_key}
    )
    rollout_id = created["rollout_id"]
    log.info("rollout %s of %s %s to %s", rollout_id, slot, version, ", ".join(created["devices"]))
    return {"rollout_id": rollout_id, "devices": created["devices"], "sha256": sha256}


class Verdict(enum.Enum):
    RUNNING = "running"
    SHIPPED = "shipped"
    FAILED = "failed"


_RUNNING_STATES = {"in_progress"}
_FAILED_STATES = {"paused", "aborted", "rolled_back", "superseded"}


def device_reasons(rollout: dict) -> list[str]:
    """One line per device that is not serving the model: its outcome and reason."""
    lines = []
    for device, progress in sorted((rollout.get("devices") or {}).items()):
        outcome = progress.get("outcome")
        if outcome == "active":
            continue
        line = f"{device}: {outcome}"
        reason = progress.get("reason")
        message = progress.get("message")
        if reason:
            line += f": {reason}"
        if message and message != reason:
            line += f" ({message})"
        lines.append(line)
    return lines


def judge(rollout: dict) -> tuple[Verdict, str]:
    """The fleet's verdict on a rollout view, and why; decides nothing else."""
    state = rollout.get("state")
    rollout_id = rollout.get("rollout_id")
    counts = sorted((rollout.get("summary") or {}).items())
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts if n) or "no devices"
    if state in _RUNNING_STATES:
        return Verdict.RUNNING, f"rollout {rollout_id} in progress: wave {rollout.get('wave')}, {summary}"
    reasons = device_reasons(rollout)
    if state == "completed":
        active = (rollout.get("summary") or {}).get("active", 0)
        if active > 0:
            return Verdict.SHIPPED, f"rollout {rollout_id} completed: {summary}"
        return Verdict.FAILED, _failure(rollout, "completed with no device serving the model", reasons)
    if state in _FAILED_STATES:
        what = rollout.get("reason") or state
        if state == "paused":
            what += " (an operator may resume it; then run this step again)"
        return Verdict.FAILED, _failure(rollout, f"{state}: {what}", reasons)
    return Verdict.FAILED, _failure(rollout, f"unknown state {state!r}", reasons)


def _failure(rollout: dict, what: str, reasons: list[str]) -> str:
    head = f"rollout {rollout.get('rollout_id')} of {rollout.get('slot')} {rollout.get('version')} {what}"
    if not reasons:
        return head
    return head + "; " + "; ".join(reasons)


def wait_for_rollout(
    server: Server,
    rollout_id: str,
    *,
    timeout_s: float,
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Polls the rollout until the fleet took the model (returns the rollout) or did not
    (raises :class:`RolloutFailed`); :class:`RolloutTimeout` after ``timeout_s``.

    An unreachable server or a 5xx answer is asked again until the deadline; any other
    error answer is final.
    """
    deadline = clock() + timeout_s
    last: dict | None = None
    said = None
    while True:
        try:
            last = server.get(f"/api/v1/rollouts/{rollout_id}")
        except ApiError as err:
            if not err.transient:
                raise
            log.warning("polling rollout %s: %s", rollout_id, err)
        else:
            verdict, why = judge(last)
            if verdict is Verdict.SHIPPED:
                log.info("%s", why)
                return last
            if verdict is Verdict.FAILED:
                raise RolloutFailed(why, last)
            if why != said:
                log.info("%s", why)
                said = why
        if clock() >= deadline:
            seen = judge(last)[1] if last is not None else "never answered"
            raise RolloutTimeout(f"rollout {rollout_id}: no verdict after {timeout_s:.0f} s; {seen}", last)
        sleep(min(poll_s, max(0.0, deadline - clock())))
