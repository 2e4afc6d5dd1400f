"""Quantization step: INT8 QDQ variants of a run's float model, each measured.

- ``ptq``: post-training quantization with ``onnxruntime.quantization.quantize_static``
  (QDQ format, MinMax calibration over the run's calibration slice, uint8 asymmetric
  activations, int8 symmetric weights, per-channel by default).
- ``qat``: quantization-aware fine-tuning of the float PyTorch weights with
  ``torch.ao.quantization`` (eager mode: fused Conv+ReLU, ``prepare_qat``), exported to
  ONNX QuantizeLinear/DequantizeLinear pairs.

Both write ``RUN/<name>.onnx`` and ``RUN/<name>.json`` with the variant's held-out
accuracy and its top-1 agreement with the float model, measured by running both files
in onnxruntime.

``ptq(calibration=...)`` also has deliberately broken calibrations, for tests and for
checking that the gate catches a bad model:

- ``constant``: every calibration input is one flat grey image (all pixels 0.5);
- ``zeros``: every calibration input is black;
- ``scaled``: the calibration slice multiplied by 100, so every range is 100x too wide.

See the README for how far each one degrades the model.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import evaluate, spec
from .runs import Run, write_json

CALIBRATIONS = ("data", "constant", "zeros", "scaled")
QAT_EPOCHS = 3
QAT_LR = 5e-4
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class ArrayReader:
    """A ``CalibrationDataReader`` over an array of inputs, ``batch`` samples at a time."""

    def __init__(self, x: np.ndarray, batch: int = 16) -> None:
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.batch = batch
        self.pos = 0

    def get_next(self) -> dict | None:
        if self.pos >= len(self.x):
            return None
        chunk = self.x[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return {spec.INPUT: chunk}

    def rewind(self) -> None:
        self.pos = 0

    def __len__(self) -> int:
        return (len(self.x) + self.batch - 1) // self.batch


def calibration_inputs(x_calib: np.ndarray, mode: str) -> np.ndarray:
    if mode == "data":
        return x_calib
    if mode == "constant":
        return np.full_like(x_calib, 0.5)
    if mode == "zeros":
        return np.zeros_like(x_calib)
    if mode == "scaled":
        return x_calib * np.float32(100.0)
    raise ValueError(f"unknown calibration {mode!r}; one of {', '.join(CALIBRATIONS)}")


def qdq_counts(path: Path) -> dict[str, int]:
    graph = onnx.load(str(path)).graph
    return {op: sum(1 for n in graph.node if n.op_type == op) for op in QDQ_OPS}


def measure(run: Run, onnx_path: Path) -> dict:
    result = evaluate.evaluate(onnx_path, run.root)
    result["float_accuracy"] = run.metrics()["accuracy"]
    result["qdq_nodes"] = qdq_counts(onnx_path)
    result["bytes"] = onnx_path.stat().st_size
    return result


def ptq(
    run_dir: Path,
    out: Path | None = None,
    calibration: str = "data",
    per_channel: bool = True,
) -> dict:
    """Post-training static quantization of ``RUN/model.onnx``; returns its measurements."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    run = Run(run_dir)
    ds = run.dataset()
    name = "model.int8_ptq" if calibration == "data" else f"model.int8_ptq_{calibration}"
    out = Path(out) if out is not None else run.root / f"{name}.onnx"
    reader = ArrayReader(calibration_inputs(ds.x_calib, calibration))
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quantized = Path(tmp) / "quantized.onnx"
        quant_pre_process(str(run.float_model), str(prepared))
        quantize_static(
            str(prepared),
            str(quantized),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        spec.save_onnx(spec.canonicalize(onnx.load(str(quantized))), out)
    result = measure(run, out)
    result.update(
        method="ptq",
        calibration=calibration,
        calibration_count=len(ds.x_calib),
        per_channel=per_channel,
    )
    write_json(out.with_suffix(".json"), result)
    return result


def _qat_qconfig():
    import torch
    from torch.ao import quantization as tq

    # Plain FakeQuantize (not the fused default): its qparams can be frozen and exported.
    # Ranges match the PTQ variant and ONNX's QuantizeLinear: uint8 asymmetric activations,
    # int8 symmetric per-output-channel weights.
    return tq.QConfig(
        activation=tq.FakeQuantize.with_args(
            observer=tq.MovingAverageMinMaxObserver,
            quant_min=0,
            quant_max=255,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
        ),
        weight=tq.FakeQuantize.with_args(
            observer=tq.MovingAveragePerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        ),
    )


def _frozen_qdq(fake_quant):
    """An exportable module equal to a trained ``FakeQuantize`` with observers off:
    quantize then dequantize with its fixed scale and zero point
    (``torch.ops.quantized_decomposed``, which the ONNX exporter turns into
    QuantizeLinear/DequantizeLinear)."""
    import torch

    # Importing it registers torch.ops.quantized_decomposed.
    import torch.ao.quantization.fx._decomposed
    from torch import nn

    class FrozenQDQ(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qmin = int(fake_quant.quant_min)
            self.qmax = int(fake_quant.quant_max)
            self.dtype = torch.uint8 if self.qmin == 0 else torch.int8
            self.per_channel = fake_quant.qscheme in (
                torch.per_channel_symmetric,
                torch.per_channel_affine,
            )
            if self.per_channel:
                self.axis = int(fake_quant.ch_axis)
                self.register_buffer("scale", fake_quant.scale.detach().clone().float())
                self.register_buffer("zero_point", fake_quant.zero_point.detach().clone().long())
            else:
                self.scale_value = float(fake_quant.scale.reshape(-1)[0])
                self.zero_point_value = int(fake_quant.zero_point.reshape(-1)[0])

        def forward(self, x):
            qd = torch.ops.quantized_decomposed
            if self.per_channel:
                args = (self.scale, self.zero_point, self.axis, self.qmin, self.qmax, self.dtype)
                return qd.dequantize_per_channel(qd.quantize_per_channel(x, *args), *args)
            args = (self.scale_value, self.zero_point_value, self.qmin, self.qmax, self.dtype)
            return qd.dequantize_per_tensor(qd.quantize_per_tensor(x, *args), *args)

    return FrozenQDQ()


def _freeze_fake_quant(module) -> None:
    from torch.ao import quantization as tq

    for name, child in module.named_children():
        if isinstance(child, tq.FakeQuantize):
            setattr(module, name, _frozen_qdq(child))
        else:
            _freeze_fake_quant(child)


def fold_weight_quantization(model: onnx.ModelProto) -> onnx.ModelProto:
    """Stores quantized weights as int8 initializers feeding DequantizeLinear.

    The exporter quantizes float weights inside the graph (initializer ->
    QuantizeLinear [-> Clip] -> DequantizeLinear); this computes those constant
    subgraphs once (round half to even, as QuantizeLinear does) so the file carries int8
    weights, as onnxruntime's own QDQ output does.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    remove: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not all(n in inits for n in node.input):
            continue
        w = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 else np.uint8(0)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
            zp = zp.reshape(shape)
        info = np.iinfo(zp.dtype)
        q = np.rint(w / scale) + zp.astype(np.float32)
        q = np.clip(q, info.min, info.max)
        chain = [node]
        out = node.output[0]
        users = consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Clip":
            clip = users[0]
            bounds = [numpy_helper.to_array(inits[n]) if n else None for n in clip.input[1:]]
            if all(b is None or b.size == 1 for b in bounds) and all(
                (not n) or n in inits for n in clip.input[1:]
            ):
                lo = bounds[0] if len(bounds) > 0 and bounds[0] is not None else info.min
                hi = bounds[1] if len(bounds) > 1 and bounds[1] is not None else info.max
                q = np.clip(q, lo, hi)
                chain.append(clip)
                out = clip.output[0]
                users = consumers.get(out, [])
        if not users or any(u.op_type != "DequantizeLinear" for u in users):
            continue
        tensor = numpy_helper.from_array(q.astype(zp.dtype), name=f"{node.input[0]}_quantized")
        new_inits.append(tensor)
        for user in users:
            user.input[0] = tensor.name
        remove.extend(chain)
    for node in remove:
        graph.node.remove(node)
    graph.initializer.extend(new_inits)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def qat(
    run_dir: Path,
    out: Path | None = None,
    epochs: int = QAT_EPOCHS,
    lr: float = QAT_LR,
    threads: int = 1,
) -> dict:
    """Quantization-aware fine-tuning from ``RUN/model.pt``; returns its measurements."""
    import torch
    from torch.ao import quantization as tq

    from . import model as model_mod
    from .train import fit

    run = Run(run_dir)
    ds = run.dataset()
    seed = int(run.metrics()["seed"])
    out = Path(out) if out is not None else run.root / "model.int8_qat.onnx"
    model_mod.seed_everything(seed, threads)

    net = model_mod.DigitsCNN()
    net.load_state_dict(torch.load(run.weights, weights_only=True))
    net.train()
    net = tq.fuse_modules_qat(net, model_mod.FUSE)
    net.qconfig = _qat_qconfig()
    tq.prepare_qat(net, inplace=True)
    losses = fit(net, ds.x_train, ds.y_train, epochs=epochs, lr=lr, seed=seed + 1)
    net.apply(tq.disable_observer)
    net.eval()

    frozen = copy.deepcopy(net)
    _freeze_fake_quant(frozen)
    with torch.no_grad():
        x = torch.from_numpy(ds.x_eval[:64])
        drift = float((frozen(x) - net(x)).abs().max())
    if drift > 1e-5:
        raise RuntimeError(f"frozen fake-quant model differs from the trained one by {drift}")
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "qat.onnx"
        proto = model_mod.export_onnx(frozen, exported)
    proto = spec.canonicalize(fold_weight_quantization(proto))
    onnx.checker.check_model(proto)
    spec.save_onnx(proto, out)

    result = measure(run, out)
    result.update(method="qat", epochs=epochs, lr=lr, final_loss=losses[-1])
    write_json(out.with_suffix(".json"), result)
    return result
