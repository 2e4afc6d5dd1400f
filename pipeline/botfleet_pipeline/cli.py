"""``python -m botfleet_pipeline train|quantize|evaluate``: the steps from a shell.

Each command prints its measurements as one JSON object on stdout. ``--min-agreement``
turns a measurement into a gate: the command exits 1 when the model's top-1 agreement
with its float parent is below the threshold (an Airflow task then fails).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m botfleet_pipeline",
        description="botfleet training pipeline: train, quantize, evaluate",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the float model and write a run directory")
    t.add_argument("--out", type=Path, required=True, help="run directory to write")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=None, help="default 15")
    t.add_argument("--lr", type=float, default=None, help="default 3e-3")
    t.add_argument(
        "--threads", type=int, default=1, help="torch threads; part of what makes a run reproducible"
    )

    q = sub.add_parser("quantize", help="write and measure an INT8 QDQ variant of a run's model")
    q.add_argument("--run", type=Path, required=True, help="run directory written by train")
    q.add_argument("--method", choices=["ptq", "qat"], default="ptq")
    q.add_argument(
        "--out", type=Path, default=None, help="default RUN/model.int8_<method>[_<calibration>].onnx"
    )
    q.add_argument(
        "--calibration",
        choices=["data", "constant", "zeros", "scaled"],
        default="data",
        help="ptq: calibration inputs; anything but 'data' is deliberately broken (for tests)",
    )
    q.add_argument("--per-tensor", action="store_true", help="ptq: per-tensor instead of per-channel weights")
    q.add_argument("--epochs", type=int, default=None, help="qat: fine-tuning epochs (default 3)")
    q.add_argument("--lr", type=float, default=None, help="qat: learning rate (default 5e-4)")
    q.add_argument("--threads", type=int, default=1, help="qat: torch threads")
    q.add_argument("--min-agreement", type=float, default=None, help="exit 1 below this top-1 agreement")

    e = sub.add_parser("evaluate", help="measure an ONNX file on a run's held-out set; export the gate set")
    e.add_argument("--run", type=Path, required=True, help="run directory written by train")
    e.add_argument("--model", type=Path, default=None, help="ONNX file to measure (default RUN/model.onnx)")
    e.add_argument("--export-gate", type=Path, default=None, help="write the on-device gate set (JSON) here")
    e.add_argument("--gate-samples", type=int, default=None, help="samples in the gate set (default 64)")
    e.add_argument("--gate", type=Path, default=None, help="also measure agreement on this gate file")
    e.add_argument("--min-agreement", type=float, default=None, help="exit 1 below this top-1 agreement")
    return p


def _kwargs(**values):
    return {k: v for k, v in values.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    agreements: list[float] = []
    if args.command == "train":
        from .train import train

        result = train(
            args.out, seed=args.seed, threads=args.threads, **_kwargs(epochs=args.epochs, lr=args.lr)
        )
    elif args.command == "quantize":
        from . import quantize

        if args.method == "ptq":
            result = quantize.ptq(
                args.run, out=args.out, calibration=args.calibration, per_channel=not args.per_tensor
            )
        else:
            if args.calibration != "data" or args.per_tensor:
                print("--calibration and --per-tensor apply to --method ptq only", file=sys.stderr)
                return 2
            result = quantize.qat(
                args.run, out=args.out, threads=args.threads, **_kwargs(epochs=args.epochs, lr=args.lr)
            )
        agreements.append(result["top1_agreement"])
    else:
        from . import evaluate
        from .runs import Run

        onnx_path = args.model if args.model is not None else Run(args.run).float_model
        result = evaluate.evaluate(onnx_path, args.run)
        agreements.append(result["top1_agreement"])
        if args.export_gate is not None:
            result["exported_gate"] = evaluate.export_gate(
                args.run, args.export_gate, **_kwargs(count=args.gate_samples)
            )
        if args.gate is not None:
            result["gate"] = evaluate.evaluate_gate(onnx_path, args.gate)
            agreements.append(result["gate"]["top1_agreement"])
    print(json.dumps(result, indent=2, sort_keys=True))
    if args.min_agreement is not None and min(agreements) < args.min_agreement:
        print(
            f"top-1 agreement {min(agreements):.4f} is below --min-agreement {args.min_agreement}",
            file=sys.stderr,
        )
        return 1
    return 0
