"""Measures ONNX files with onnxruntime and exports the on-device evaluation set.

Every number here comes from running the exported file itself (onnxruntime, CPU, one
thread), never from the PyTorch module it was exported from.

The evaluation set is a small, self-contained sample of the held-out set that travels
with a model (the ``evaluation`` part of the upload): a robot runs the candidate model on
each sample and compares its top-1 with the float parent's. Its format is the contract
between pipeline, server and agent (schema 1); exactly these members::

    {"schema": 1, "input": "x", "output": "logits", "shape": [1, 1, 8, 8],
     "parent_sha256": "<64 hex>", "dataset_digest": "<hex>",
     "samples": [{"data": [...64 floats], "top1": 3, "output": [...10 floats]}, ...]}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import spec as model
from .runs import Run

GATE_SAMPLES = 64
# Limits of the evaluation-set contract (schema 1).
GATE_SCHEMA = 1
MAX_GATE_SAMPLES = 4096
MAX_GATE_BYTES = 16 * 1024 * 1024


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(path: Path, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Runs the ONNX file at ``path`` over ``x`` in batches and returns the logits."""
    sess = session(path)
    out = [
        sess.run([model.OUTPUT], {model.INPUT: np.ascontiguousarray(x[i : i + batch])})[0]
        for i in range(0, len(x), batch)
    ]
    return np.concatenate(out, axis=0)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(pred == labels))


def agreement(pred: np.ndarray, parent_pred: np.ndarray) -> float:
    return float(np.mean(pred == parent_pred))


def evaluate(onnx_path: Path, run_dir: Path, predictions: bool = False) -> dict:
    """Accuracy of ``onnx_path`` on the run's held-out set, and its top-1 agreement with
    the run's float model on the same inputs. ``predictions`` adds the model's top-1 for
    every held-out sample, in order (``top1``)."""
    run = Run(run_dir)
    ds = run.dataset()
    pred = logits(onnx_path, ds.x_eval).argmax(axis=1)
    parent = logits(run.float_model, ds.x_eval).argmax(axis=1)
    result = {
        "model": str(onnx_path),
        "sha256": model.sha256_file(onnx_path),
        "eval_count": len(ds.y_eval),
        "accuracy": accuracy(pred, ds.y_eval),
        "top1_agreement": agreement(pred, parent),
        "parent_sha256": model.sha256_file(run.float_model),
        "dataset_digest": ds.digest(),
    }
    if predictions:
        result["top1"] = [int(v) for v in pred]
    return result


def export_gate(run_dir: Path, out: Path, count: int = GATE_SAMPLES) -> dict:
    """Writes the evaluation set: the first ``count`` held-out samples with the float
    parent's top-1 and outputs, in the format of the evaluation-set contract."""
    if not 1 <= count <= MAX_GATE_SAMPLES:
        raise ValueError(f"an evaluation set holds 1 to {MAX_GATE_SAMPLES} samples, not {count}")
    run = Run(run_dir)
    ds = run.dataset()
    if count > len(ds.x_eval):
        raise ValueError(f"the run has {len(ds.x_eval)} held-out samples, fewer than {count}")
    x = ds.x_eval[:count]
    parent_logits = logits(run.float_model, x)
    gate = {
        "schema": GATE_SCHEMA,
        "input": model.INPUT,
        "output": model.OUTPUT,
        "shape": [1, *model.INPUT_SHAPE],
        "parent_sha256": model.sha256_file(run.float_model),
        "dataset_digest": ds.digest(),
        "samples": [
            {
                # Pixels are multiples of 1/16: exact in float32 and short in JSON.
                "data": [float(v) for v in sample.reshape(-1)],
                "top1": int(row.argmax()),
                "output": [round(float(v), 5) for v in row],
            }
            for sample, row in zip(x, parent_logits, strict=True)
        ],
    }
    text = json.dumps(gate, separators=(",", ":")) + "\n"
    if len(text.encode()) > MAX_GATE_BYTES:
        raise ValueError(f"the evaluation set would be {len(text.encode())} bytes, over {MAX_GATE_BYTES}")
    Path(out).write_text(text)
    return {"gate": str(out), "samples": len(gate["samples"]), "bytes": Path(out).stat().st_size}


def load_gate(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads an evaluation set back: inputs ``[n, 1, 8, 8]``, parent top-1 ``[n]``,
    parent outputs ``[n, 10]``."""
    gate = json.loads(Path(path).read_text())
    if gate.get("schema") != GATE_SCHEMA:
        raise ValueError(f"{path}: evaluation set schema {gate.get('schema')!r}, expected {GATE_SCHEMA}")
    shape = tuple(gate["shape"])
    x = np.stack([np.asarray(s["data"], dtype=np.float32).reshape(shape)[0] for s in gate["samples"]])
    top1 = np.asarray([s["top1"] for s in gate["samples"]], dtype=np.int64)
    parent_out = np.asarray([s["output"] for s in gate["samples"]], dtype=np.float32)
    return x, top1, parent_out


def evaluate_gate(onnx_path: Path, gate_path: Path) -> dict:
    """Top-1 agreement of ``onnx_path`` with the parent's answers stored in an
    evaluation set, computed as a robot computes it."""
    x, top1, _ = load_gate(gate_path)
    pred = logits(onnx_path, x).argmax(axis=1)
    return {
        "model": str(onnx_path),
        "gate": str(gate_path),
        "samples": len(top1),
        "top1_agreement": agreement(pred, top1),
    }
