"""Training step: a small CNN on digits, deterministic for a given seed, thread count and
device (``cpu``, ``cuda``, or ``auto``: CUDA when torch sees a GPU, as on the cluster's
training nodes)."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data, evaluate, model, spec
from .runs import Run, write_json

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


def train(
    out_dir: Path,
    seed: int = 0,
    epochs: int = EPOCHS,
    lr: float = LR,
    threads: int = 1,
    device: str = "cpu",
) -> dict:
    """Trains the float model on ``device`` (see ``pick_device``) and writes the run
    directory (see ``runs.Run``).

    Returns the metrics written to ``metrics.json``; ``accuracy`` is measured with
    onnxruntime on the exported file over the held-out set.
    """
    run = Run(out_dir)
    where = pick_device(device)
    run.root.mkdir(parents=True, exist_ok=True)
    model.seed_everything(seed, threads)
    ds = data.make_split(seed)
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
    write_json(run.metrics_path, metrics)
    return metrics
