from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import openapi
import pytest
import torch

from botfleet_pipeline import data, evaluate, spec, train
from botfleet_pipeline import dataset as snapshots
from botfleet_pipeline.runs import Run

# Measured: 0.978 on the held-out set (seed 0, 15 epochs, one thread).
FLOAT_ACCURACY_FLOOR = 0.96


def test_float_accuracy_is_measured_on_the_exported_file(run_dir):
    run = Run(run_dir)
    metrics = run.metrics()
    assert metrics["accuracy"] >= FLOAT_ACCURACY_FLOOR, metrics
    ds = run.dataset()
    pred = evaluate.logits(run.float_model, ds.x_eval).argmax(axis=1)
    assert metrics["accuracy"] == evaluate.accuracy(pred, ds.y_eval)
    assert metrics["eval_count"] == len(ds.y_eval) == data.EVAL_COUNT


def test_metrics_record_digest_seed_versions_and_file_hash(run_dir):
    run = Run(run_dir)
    metrics = json.loads(run.metrics_path.read_text())
    assert metrics["onnx_sha256"] == spec.sha256_file(run.float_model)
    assert metrics["seed"] == 0
    assert metrics["versions"]["torch"] == torch.__version__
    assert metrics["versions"]["onnx"] == onnx.__version__
    assert metrics["versions"]["onnxruntime"] == onnxruntime.__version__
    with np.load(run.dataset_path) as saved:
        digest = data.digest_arrays({name: saved[name] for name in data.ARRAYS})
    assert metrics["dataset"]["digest"] == digest
    assert metrics["dataset"]["sizes"] == {"train": 1257, "calib": 180, "eval": 360}


def test_training_twice_gives_the_same_onnx_bytes(run_dir, tmp_path):
    # The strongest form holds: same seed and thread count give a byte-identical file
    # (exporter metadata with local paths is stripped), not merely equal outputs.
    again = train.train(tmp_path / "again", seed=0)
    first = Run(run_dir)
    assert again["onnx_sha256"] == first.metrics()["onnx_sha256"]
    assert (tmp_path / "again" / "model.onnx").read_bytes() == first.float_model.read_bytes()
    assert again["dataset"]["digest"] == first.metrics()["dataset"]["digest"]


def test_split_depends_on_the_seed_only():
    a, b, c = data.make_split(0), data.make_split(0), data.make_split(1)
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()
    assert set(np.unique(a.y_eval)) == set(range(10))
    assert a.x_eval.dtype == np.float32
    assert a.x_eval.shape == (data.EVAL_COUNT, 1, 8, 8)
    assert a.x_train.min() >= 0.0
    assert a.x_train.max() <= 1.0


def test_saved_split_is_checked_against_the_recorded_digest(run_dir, tmp_path):
    ds = Run(run_dir).dataset()
    tampered = data.Dataset(**{**ds.arrays(), "y_eval": np.roll(ds.y_eval, 1)}, seed=ds.seed)
    data.save(tampered, tmp_path / "dataset.npz")
    with pytest.raises(ValueError, match="digest"):
        data.load(tmp_path / "dataset.npz", expected_digest=ds.digest())


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_onnx_interface_and_dynamic_batch(run_dir):
    path = Run(run_dir).float_model
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["x"]
    assert [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch, *rest = _dims(graph.input[0])
    assert isinstance(batch, str)
    assert rest == [1, 8, 8]
    out_batch, classes = _dims(graph.output[0])
    assert out_batch == batch
    assert classes == 10

    sess = evaluate.session(path)
    x = Run(run_dir).dataset().x_eval[:7]
    seven = sess.run(["logits"], {"x": x})[0]
    assert seven.shape == (7, 10)
    assert seven.dtype == np.float32
    for i in range(7):
        one = sess.run(["logits"], {"x": x[i : i + 1]})[0]
        assert one.shape == (1, 10)
        np.testing.assert_allclose(one[0], seven[i], rtol=1e-5, atol=1e-5)


def test_cli_train_writes_a_run(tmp_path, capsys):
    from botfleet_pipeline import cli

    assert cli.main(["train", "--out", str(tmp_path / "run"), "--epochs", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["onnx_sha256"] == spec.sha256_file(tmp_path / "run" / "model.onnx")
    assert printed["epochs"] == 1


def test_auto_device_follows_what_torch_sees_and_is_recorded(run_dir):
    assert train.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert train.pick_device("cpu") == torch.device("cpu")
    # The run_dir fixture trains with the default device.
    assert Run(run_dir).metrics()["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        train.train(tmp_path / "run", epochs=1, device="cuda")
    assert not (tmp_path / "run").exists()


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="is not cpu, cuda or auto"):
        train.pick_device("tpu")


# --- training on a data-set snapshot ---------------------------------------------------

SNAPSHOT_SAMPLES = 24


def make_snapshot(run_dir, path, count=SNAPSHOT_SAMPLES):
    """A data-set export as botfleet-server writes one, made from the split's training
    images: each answered by the run's float model (what a robot serving it recorded), and
    two samples a digits model cannot learn from. Returns (digest, inputs, pseudo-labels)."""
    split = data.make_split(0)
    x = split.x_train[:count]
    logits = evaluate.logits(Run(run_dir).float_model, x)
    samples = [
        snapshots.make_sample(
            [("x", x[i : i + 1])],
            [("logits", logits[i : i + 1])],
            device=f"robot-{i % 3}",
            rule="low_confidence" if i % 2 else "sampled",
            captured_at=f"2026-02-01T10:{i // 60:02d}:{i % 60:02d}Z",
        )
        for i in range(count)
    ]
    samples.append(snapshots.make_sample([("x", np.zeros((1, 3, 8, 8), np.float32))], []))
    samples.append(snapshots.make_sample([("x", x[:1])], []))
    digest = snapshots.write_dataset(path, samples, id="ds-42", name="lab-week-6")
    return digest, x, logits.argmax(axis=1)


def test_training_on_a_snapshot_names_its_digest_in_the_provenance(run_dir, tmp_path, capsys):
    from botfleet_pipeline import cli, ship

    export = tmp_path / "export.tar"
    digest, x, pseudo = make_snapshot(run_dir, export)
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--epochs", "1", "--dataset", str(export)]
    assert cli.main([*argv, "--dataset-digest", f"sha256:{digest}"]) == 0
    printed = capsys.readouterr()
    metrics = json.loads(printed.out)
    assert metrics == Run(out).metrics()
    assert metrics["dataset"]["snapshot"] == {
        "digest": digest,
        "id": "ds-42",
        "name": "lab-week-6",
        "samples": SNAPSHOT_SAMPLES + 2,
        "used": SNAPSHOT_SAMPLES,
        "examples": SNAPSHOT_SAMPLES,
        "labels": "pseudo",
        "labelled": {"pseudo": SNAPSHOT_SAMPLES},
        "skipped": {"first input shape [1, 3, 8, 8] is not [N, 1, 8, 8]": 1, "no output recorded": 1},
    }
    assert f"sha256:{digest}): {SNAPSHOT_SAMPLES} of {SNAPSHOT_SAMPLES + 2} samples used" in printed.err
    assert (
        "skipped: 1: first input shape [1, 3, 8, 8] is not [N, 1, 8, 8]; 1: no output recorded" in printed.err
    )
    # The snapshot joined the training set only; the saved split (and its digest) says so.
    saved = Run(out).dataset()
    assert metrics["dataset"]["sizes"] == {"train": 1257 + SNAPSHOT_SAMPLES, "calib": 180, "eval": 360}
    np.testing.assert_array_equal(saved.x_train[-SNAPSHOT_SAMPLES:], x)
    np.testing.assert_array_equal(saved.y_train[-SNAPSHOT_SAMPLES:], pseudo)
    np.testing.assert_array_equal(saved.x_eval, Run(run_dir).dataset().x_eval)

    metadata = ship.model_metadata(
        out,
        Run(out).float_model,
        slot="digits",
        name="digits-cnn",
        version="1",
        pipeline_run="r",
        min_agreement=None,
    )
    provenance = metadata["provenance"]
    assert provenance["dataset"] == f"sha256:{digest}"
    assert provenance["metrics"]["dataset_samples"] == SNAPSHOT_SAMPLES
    assert provenance["metrics"]["dataset_pseudo_labelled"] == SNAPSHOT_SAMPLES
    assert not openapi.errors("ModelMetadata", metadata)


def test_a_snapshot_is_checked_before_anything_is_written(run_dir, tmp_path, capsys):
    from botfleet_pipeline import cli

    export = tmp_path / "export.tar"
    digest, _, _ = make_snapshot(run_dir, export, count=2)
    with pytest.raises(snapshots.DatasetError, match=f"digest is {digest}, not the expected"):
        train.train(tmp_path / "run", epochs=1, dataset=export, dataset_digest="0" * 64)
    argv = ["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--dataset", str(export)]
    assert cli.main([*argv, "--dataset-digest", "1" * 64]) == 1
    assert "data set refused:" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--dataset-digest", digest]) == 2
    unusable = tmp_path / "unusable.tar"
    snapshots.write_dataset(
        unusable, [snapshots.make_sample([("x", np.zeros((1, 3, 8, 8), np.float32))], [])]
    )
    with pytest.raises(
        snapshots.DatasetError, match=r"no sample .* can be trained on \(1: first input shape"
    ):
        train.train(tmp_path / "run", epochs=1, dataset=unusable)
    assert not (tmp_path / "run").exists()


def test_snapshot_labels_come_from_labels_csv_when_given(run_dir, tmp_path):
    export = tmp_path / "export.tar"
    make_snapshot(run_dir, export, count=3)
    shas = [s.sha256 for s in snapshots.read_dataset(export).samples]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"sha256,label\n{shas[0]},4\n{shas[2]},9\n")
    _, taken, record = train.snapshot_examples(export, labels=labels)
    assert taken.y.tolist() == [4, 9]
    assert record["labels"] == "labels.csv"
    assert record["labels_sha256"] == spec.sha256_file(labels)
    assert record["labelled"] == {"labels.csv": 2}
    assert record["skipped"] == {
        "first input shape [1, 3, 8, 8] is not [N, 1, 8, 8]": 1,
        "no label in labels.csv": 2,
    }


def test_empty_dataset_flags_are_no_flags():
    # The DAG's argv always carries them, rendered empty when its params are null.
    from botfleet_pipeline import cli

    argv = ["train", "--out", "r", "--dataset", "", "--dataset-digest", "", "--dataset-labels", ""]
    args = cli._parser().parse_args(argv)
    assert (args.dataset, args.dataset_digest, args.dataset_labels) == (None, None, None)
