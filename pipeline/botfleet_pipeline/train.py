"""Training step: a small CNN on digits, deterministic for a given seed, thread count and
device (``cpu``, ``cuda``, or ``auto``: CUDA when torch sees a GPU, as on the cluster's
training nodes).

With a data-set snapshot exported by botfleet-server (``dataset``), the snapshot's samples
that fit the model's input are added to the training data (never to the calibration or
held-out sets); see :func:`snapshot_examples`.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data, evaluate, model, spec
from . import dataset as snapshots
from .runs import Run, write_json

log = logging.getLogger(__name__)

EPOCHS = 15
BATCH = 32
LR = 3e-3


def fit(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float,
    seed: int,
    batch: int = BATCH,
    device: torch.device | None = None,
) -> list[float]:
    """Adam on cross-entropy, shuffled by a generator seeded with ``seed``, on ``device``
    (default: the CPU); returns the mean loss of each epoch. The module is left on the CPU."""
    device = device or torch.device("cpu")
    module.to(device)
    xt = torch.from_numpy(x).to(device)
    yt = torch.from_numpy(y).to(device)
    # The shuffle is drawn on the CPU, so the batch order is the same on every device.
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator).to(device)
        total = 0.0
        for start in range(0, len(xt), batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(module(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(xt))
    module.eval()
    module.to("cpu")
    return losses


def pick_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (refused when torch sees no GPU) or ``auto`` (CUDA if there is one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device (driver, runtime class, GPU request?)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not cpu, cuda or auto")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"


def versions() -> dict:
    import onnx
    import onnxruntime
    import sklearn

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


_LABELLED = {"labels.csv": "from labels.csv", "pseudo": "pseudo (the serving model's top-1)"}


def snapshot_examples(
    path: Path, expected_digest: str | None = None, labels: Path | None = None
) -> tuple[snapshots.Snapshot, snapshots.Examples, dict]:
    """Reads and checks the data-set export at ``path`` and takes its training examples:
    every sample whose first input is FP32 ``[B, 1, 8, 8]``, labelled from ``labels``
    (``labels.csv``: sha256,label) when given, else with the serving model's top-1 recorded
    in the sample's first output (pseudo-labels: distillation from the fleet's model).
    Returns the snapshot, the examples and the record that goes into ``metrics.json``."""
    snapshot = snapshots.read_dataset(path, expected_digest=expected_digest)
    label_map = snapshots.read_labels(labels, spec.CLASSES) if labels is not None else None
    taken = snapshots.examples(snapshot, spec.INPUT_SHAPE, spec.CLASSES, label_map)
    if not taken.used:
        skipped = "; ".join(f"{n}: {r}" for r, n in sorted(taken.skipped.items())) or "it has no samples"
        raise snapshots.DatasetError(
            f"{path}: no sample of data set {snapshot.name!r} (sha256:{snapshot.digest}) "
            f"can be trained on ({skipped})"
        )
    record = {
        "digest": snapshot.digest,
        "id": snapshot.id,
        "name": snapshot.name,
        "samples": len(snapshot.samples),
        **taken.summary(),
        "labels": "labels.csv" if labels is not None else "pseudo",
    }
    if labels is not None:
        record["labels_sha256"] = spec.sha256_file(labels)
    log.info(
        "data set %s (%s, sha256:%s): %d of %d samples used (%d examples); labels: %s; skipped: %s",
        snapshot.name,
        snapshot.id,
        snapshot.digest,
        taken.used,
        len(snapshot.samples),
        len(taken.y),
        ", ".join(f"{n} {_LABELLED[how]}" for how, n in sorted(taken.labelled.items())) or "none",
        "; ".join(f"{n}: {why}" for why, n in sorted(taken.skipped.items())) or "none",
    )
    return snapshot, taken, record


def train(
    out_dir: Path,
    seed: int = 0,
    epochs: int = EPOCHS,
    lr: float = LR,
    threads: int = 1,
    device: str = "cpu",
    dataset: Path | None = None,
    dataset_digest: str | None = None,
    dataset_labels: Path | None = None,
) -> dict:
    """Trains the float model on ``device`` (see ``pick_device``) and writes the run
    directory (see ``runs.Run``).

    ``dataset``: a data-set export (``botfleet-server dataset export``), checked (its
    manifest digest against ``dataset_digest`` when given) before anything is written; its
    usable samples join the training set (see :func:`snapshot_examples`), and
    ``metrics.json`` records the snapshot (``dataset.snapshot``), which the ship step turns
    into the model's provenance.

    Returns the metrics written to ``metrics.json``; ``accuracy`` is measured with
    onnxruntime on the exported file over the held-out set.
    """
    if dataset is None and (dataset_digest is not None or dataset_labels is not None):
        raise ValueError("dataset_digest and dataset_labels need a dataset")
    run = Run(out_dir)
    where = pick_device(device)
    snapshot = None
    if dataset is not None:
        _, taken, snapshot = snapshot_examples(dataset, dataset_digest, dataset_labels)
    run.root.mkdir(parents=True, exist_ok=True)
    model.seed_everything(seed, threads)
    ds = data.make_split(seed)
    if snapshot is not None:
        ds = dataclasses.replace(
            ds,
            x_train=np.ascontiguousarray(np.concatenate([ds.x_train, taken.x])),
            y_train=np.ascontiguousarray(np.concatenate([ds.y_train, taken.y])),
        )
    data.save(ds, run.dataset_path)

    started = time.monotonic()
    net = model.DigitsCNN()
    losses = fit(net, ds.x_train, ds.y_train, epochs=epochs, lr=lr, seed=seed, device=where)
    train_seconds = time.monotonic() - started
    torch.save(net.state_dict(), run.weights)
    model.export_onnx(net, run.float_model)

    pred = evaluate.logits(run.float_model, ds.x_eval).argmax(axis=1)
    metrics = {
        "model": run.float_model.name,
        "onnx_sha256": spec.sha256_file(run.float_model),
        "accuracy": evaluate.accuracy(pred, ds.y_eval),
        "eval_count": len(ds.y_eval),
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "threads": threads,
        "device": device_name(where),
        "final_loss": losses[-1],
        "train_seconds": round(train_seconds, 3),
        "dataset": {"name": "sklearn.load_digits", "digest": ds.digest(), "sizes": ds.sizes()},
        "versions": versions(),
    }
    if snapshot is not None:
        metrics["dataset"]["snapshot"] = snapshot
    write_json(run.metrics_path, metrics)
    return metrics
