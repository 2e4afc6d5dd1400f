"""The model (a small CNN for 8x8 digits) and its ONNX export.

The exported graph has one input ``x`` (float32 ``[N, 1, 8, 8]``, N dynamic) and one
output ``logits`` (float32 ``[N, 10]``). Export goes through ``torch.export`` (the
``dynamo=True`` exporter); the result is canonicalized (exporter metadata such as stack
traces with local file paths is dropped) so that the file's bytes depend on the weights
only, not on where the code was run from.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.ao import quantization as tq

from .spec import CLASSES, INPUT, INPUT_SHAPE, OPSET, OUTPUT, canonicalize, save_onnx

# Conv + ReLU pairs fused for quantization-aware training.
FUSE = [["conv1", "relu1"], ["conv2", "relu2"], ["conv3", "relu3"]]


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions (16, 32, 32 channels), two max-pools, one linear layer.

    ``quant`` / ``dequant`` are identities in the float model; quantization-aware
    training replaces them with fake-quantization of the input and the output.
    """

    def __init__(self) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 2 * 2, CLASSES)
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.pool1(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        x = self.pool2(self.relu3(self.conv3(x)))
        return self.dequant(self.fc(torch.flatten(x, 1)))


def seed_everything(seed: int, threads: int = 1) -> None:
    """Seeds python, numpy and torch and makes torch pick deterministic algorithms.

    A fixed thread count matters as much as the seeds: reductions split across threads
    can round differently.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (the global generator, for any code that uses it)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def export_onnx(module: nn.Module, path: Path) -> onnx.ModelProto:
    """Exports ``module`` (in eval mode) to ``path`` with a dynamic batch dimension."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    module.eval()
    batch = torch.export.Dim("N", min=1, max=65536)
    program = torch.onnx.export(
        module,
        (torch.zeros(2, *INPUT_SHAPE),),
        input_names=[INPUT],
        output_names=[OUTPUT],
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        dynamic_shapes={"x": {0: batch}},
        verbose=False,
    )
    model = canonicalize(program.model_proto)
    onnx.checker.check_model(model)
    save_onnx(model, path)
    return model
