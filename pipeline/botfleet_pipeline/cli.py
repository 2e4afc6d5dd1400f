"""``python -m botfleet_pipeline train|quantize|evaluate|register|rollout|wait``: the
steps from a shell.

Each command prints its result as one JSON object on stdout. ``--min-agreement`` turns a
measurement into a gate: the command exits 1 when the model's top-1 agreement with its
float parent is below the threshold (an Airflow task then fails). ``register``,
``rollout`` and ``wait`` talk to botfleet-server (``--server``, default
``$BOTFLEET_SERVER_URL``; token from ``$BOTFLEET_TOKEN`` or ``--token-file``) and exit 1
with the reason on stderr when the server refuses or the fleet rejects the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_SERVER = "http://127.0.0.1:8080"


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
    t.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="where to train; auto: CUDA when torch sees a GPU (default cpu)",
    )
    # An empty value is the same as leaving the flag out (a templated argv, as in the DAG).
    t.add_argument(
        "--dataset",
        type=_path_or_none,
        default=None,
        help="a botfleet-server data-set export (tar) whose samples join the training data",
    )
    t.add_argument(
        "--dataset-digest",
        type=lambda value: value or None,
        default=None,
        help="the export's manifest digest (X-Botfleet-Dataset-Digest), hex or sha256:hex; checked",
    )
    t.add_argument(
        "--dataset-labels",
        type=_path_or_none,
        default=None,
        help="labels.csv (columns sha256,label) for the export's samples; "
        "default: the serving model's top-1 in each sample (pseudo-labels)",
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
    e.add_argument(
        "--report", type=Path, default=None, help="also write the result, with every held-out top-1, here"
    )

    r = sub.add_parser("register", help="upload a model with its metadata and evaluation set")
    _server_args(r)
    r.add_argument("--run", type=Path, required=True, help="run directory written by train")
    r.add_argument("--model", type=Path, required=True, help="the ONNX file to upload")
    r.add_argument("--evaluation", type=Path, default=None, help="evaluation set (evaluate --export-gate)")
    r.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="on-device accuracy gate: least top-1 agreement on the evaluation set (needs --evaluation)",
    )
    r.add_argument("--slot", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--version", required=True)
    r.add_argument("--pipeline-run", required=True, help="the pipeline run id, recorded in the provenance")
    r.add_argument("--gate", type=json.loads, default=None, help="benchmark gate (JSON object)")
    r.add_argument("--commit", default=None, help="source commit, recorded in the provenance")
    r.add_argument("--source", default=None, help="where the model comes from, recorded in the provenance")

    o = sub.add_parser("rollout", help="roll a registered model out and wait for the fleet's verdict")
    _server_args(o)
    o.add_argument("--slot", required=True)
    o.add_argument("--version", required=True)
    o.add_argument("--sha256", required=True, help="the registered bytes the rollout must carry")
    target = o.add_mutually_exclusive_group(required=True)
    target.add_argument("--selector", default=None, help="label selector, e.g. site=lab,arch=aarch64")
    target.add_argument("--device", action="append", dest="devices", help="a device id (repeatable)")
    o.add_argument("--strategy", type=json.loads, default=None, help="waves, thresholds, deadline (JSON)")
    o.add_argument("--idempotency-key", required=True, help="e.g. the pipeline run id")
    o.add_argument("--supersede", action="store_true", help="take over devices a live rollout owns")
    o.add_argument("--no-wait", action="store_true", help="return once the rollout has started")
    _wait_args(o)

    w = sub.add_parser("wait", help="wait for a rollout's verdict; exit 1 unless the fleet took the model")
    _server_args(w)
    w.add_argument("rollout_id")
    _wait_args(w)
    return p


def _path_or_none(value: str) -> Path | None:
    return Path(value) if value else None


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("BOTFLEET_SERVER_URL", DEFAULT_SERVER),
        help=f"botfleet-server base URL (default $BOTFLEET_SERVER_URL or {DEFAULT_SERVER})",
    )
    p.add_argument(
        "--token-file", type=Path, default=None, help="file holding the API token (default $BOTFLEET_TOKEN)"
    )


def _wait_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the verdict")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between polls")


def _ship(args) -> dict:
    from . import ship
    from .client import Server

    token = args.token_file.read_text().strip() if args.token_file is not None else None
    server = Server.at(args.server, token)
    if args.command == "register":
        metadata = ship.model_metadata(
            args.run,
            args.model,
            slot=args.slot,
            name=args.name,
            version=args.version,
            pipeline_run=args.pipeline_run,
            min_agreement=args.min_agreement,
            gate=args.gate,
            commit=args.commit,
            source=args.source,
        )
        return ship.register(server, args.model, metadata, args.evaluation)
    if args.command == "rollout":
        created = ship.start_rollout(
            server,
            slot=args.slot,
            version=args.version,
            sha256=args.sha256,
            idempotency_key=args.idempotency_key,
            selector=args.selector,
            devices=args.devices,
            strategy=args.strategy,
            supersede=args.supersede,
        )
        if args.no_wait:
            return created
        rollout_id = created["rollout_id"]
    else:
        rollout_id = args.rollout_id
    return ship.wait_for_rollout(server, rollout_id, timeout_s=args.timeout, poll_s=args.poll)


def _kwargs(**values):
    return {k: v for k, v in values.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("register", "rollout", "wait"):
        from .client import ShipError

        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        try:
            result = _ship(args)
        except ShipError as err:
            print(err, file=sys.stderr)
            return 1
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    agreements: list[float] = []
    if args.command == "train":
        from .dataset import DatasetError
        from .train import train

        if args.dataset is None and (args.dataset_digest is not None or args.dataset_labels is not None):
            print("--dataset-digest and --dataset-labels need --dataset", file=sys.stderr)
            return 2
        # The data set's summary (samples used, labelled how, skipped why) goes to stderr.
        logger = logging.getLogger("botfleet_pipeline.train")
        handler = logging.StreamHandler(sys.stderr)
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            result = train(
                args.out,
                seed=args.seed,
                threads=args.threads,
                device=args.device,
                dataset=args.dataset,
                dataset_digest=args.dataset_digest,
                dataset_labels=args.dataset_labels,
                **_kwargs(epochs=args.epochs, lr=args.lr),
            )
        except DatasetError as err:
            print(f"data set refused: {err}", file=sys.stderr)
            return 1
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
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
        result = evaluate.evaluate(onnx_path, args.run, predictions=args.report is not None)
        top1 = result.pop("top1", None)
        agreements.append(result["top1_agreement"])
        if args.export_gate is not None:
            result["exported_gate"] = evaluate.export_gate(
                args.run, args.export_gate, **_kwargs(count=args.gate_samples)
            )
        if args.gate is not None:
            result["gate"] = evaluate.evaluate_gate(onnx_path, args.gate)
            agreements.append(result["gate"]["top1_agreement"])
        if args.report is not None:
            args.report.write_text(json.dumps({**result, "top1": top1}, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))
    min_agreement = getattr(args, "min_agreement", None)
    if min_agreement is not None and min(agreements) < min_agreement:
        print(
            f"top-1 agreement {min(agreements):.4f} is below --min-agreement {min_agreement}",
            file=sys.stderr,
        )
        return 1
    return 0
