"""The layout of a training run's directory, shared by every step.

RUN/model.onnx     float model (input ``x`` [N,1,8,8], output ``logits`` [N,10])
RUN/model.pt       its PyTorch weights (state dict), the start of quantization-aware training
RUN/dataset.npz    train / calibration / held-out evaluation arrays
RUN/metrics.json   accuracy, data set digest, seed, versions, SHA-256 of model.onnx
RUN/<variant>.onnx and RUN/<variant>.json   quantized variants and their measurements
"""

from __future__ import annotations

import json
from pathlib import Path

from . import data


class Run:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def float_model(self) -> Path:
        return self.root / "model.onnx"

    @property
    def weights(self) -> Path:
        return self.root / "model.pt"

    @property
    def dataset_path(self) -> Path:
        return self.root / "dataset.npz"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    def metrics(self) -> dict:
        return json.loads(self.metrics_path.read_text())

    def dataset(self) -> data.Dataset:
        """The run's saved split, checked against the digest recorded at training time."""
        return data.load(self.dataset_path, expected_digest=self.metrics()["dataset"]["digest"])


def write_json(path: Path, value: dict) -> None:
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
