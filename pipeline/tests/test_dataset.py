"""Data-set exports and sample files (botfleet_pipeline.dataset): what is written reads back,
and every way an export or a sample can be wrong is refused with the reason."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile

import numpy as np
import pytest

from botfleet_pipeline import dataset as ds
from botfleet_pipeline.dataset import DatasetError, SampleError

RNG = np.random.default_rng(7)


def digit(i: int, batch: int = 1, top1: int | None = None, **fields) -> bytes:
    """A sample as the digits model's robot captures it: x [batch,1,8,8], logits [batch,10]."""
    x = (np.arange(batch * 64, dtype=np.float32).reshape(batch, 1, 8, 8) + i) % 17 / np.float32(16)
    logits = np.zeros((batch, 10), np.float32)
    logits[:, (i if top1 is None else top1) % 10] = 5.0
    fields.setdefault("captured_at", f"2026-01-01T00:00:{i % 60:02d}Z")
    return ds.make_sample([("x", x)], [("logits", logits)], **fields)


def tar_of(path, members):
    """A tar with the given TarInfo-or-(name, bytes) members, in order."""
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def members_of(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]


@pytest.fixture
def export(tmp_path):
    """A three-sample export; returns (path, digest, sample files)."""
    samples = [digit(i) for i in range(3)]
    path = tmp_path / "export.tar"
    return path, ds.write_dataset(path, samples, id="ds-1", name="week-1"), samples


# --- sample files ----------------------------------------------------------------------


def test_a_sample_round_trips_every_datatype():
    inputs = [
        ("u8", RNG.integers(0, 255, (2, 3)).astype(np.uint8)),
        ("i8", RNG.integers(-128, 127, (2, 3)).astype(np.int8)),
        ("i32", RNG.integers(-(2**31), 2**31 - 1, (4,)).astype(np.int32)),
        ("i64", np.array([[-(2**62), 7]], np.int64)),
        ("b", np.array([True, False, True])),
    ]
    outputs = [
        ("f16", RNG.random((1, 5)).astype(np.float16)),
        ("f32", RNG.random((1, 10)).astype(np.float32)),
        ("f64", RNG.random((2, 2, 2))),
    ]
    candidate = [("c", np.zeros((0, 10), np.float32))]
    file = ds.make_sample(
        inputs,
        outputs,
        candidate_outputs=candidate,
        rule="disagreement",
        detail="top-1 3 != 5",
        candidate={"version": "2", "release": 2, "sha256": "ab" * 32},
        latency_ms=0.5,
    )
    sample = ds.decode_sample(file)
    assert sample.sha256 == hashlib.sha256(file).hexdigest()
    assert sample.header["rule"] == "disagreement"
    got = [*sample.inputs, *sample.outputs, *sample.candidate_outputs]
    for tensor, (name, array) in zip(got, [*inputs, *outputs, *candidate], strict=True):
        assert tensor.name == name
        assert tensor.shape == array.shape
        assert tensor.array.dtype == array.dtype
        np.testing.assert_array_equal(tensor.array, array)
    assert [t.datatype for t in sample.inputs] == ["UINT8", "INT8", "INT32", "INT64", "BOOL"]


def test_the_layout_is_magic_length_header_then_little_endian_tensors():
    file = ds.make_sample([("x", np.array([1.0, 2.0], np.float32))], [("y", np.array([7], np.int64))])
    (length,) = struct.unpack_from("<I", file, 8)
    assert file[:8] == b"BFSAMPL1"
    header = json.loads(file[12 : 12 + length])
    assert header["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [2]}]
    assert file[12 + length :] == struct.pack("<2f", 1.0, 2.0) + struct.pack("<q", 7)


def _header(**changes) -> dict:
    header = ds.decode_sample(digit(0)).header
    header.update(changes)
    return header


def _file(header, body: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return ds.MAGIC + struct.pack("<I", len(raw)) + raw + body


GOOD = digit(0)


@pytest.mark.parametrize(
    ("file", "reason"),
    [
        (b"GIF89a..", "not a sample file"),
        (b"BFS", "ends inside its magic"),
        (ds.MAGIC + b"\x01", "ends inside its header length"),
        (ds.MAGIC + struct.pack("<I", 64 * 1024 + 1), "over the limit of 65536"),
        (ds.MAGIC + struct.pack("<I", 100) + b"{}", "ends inside its header"),
        (GOOD[:-1], "take 296 bytes but the file holds 295"),
        (GOOD + b"\0", "take 296 bytes but the file holds 297"),
        (_file(b"{not json"), "header is not valid"),
        (_file(_header(extra=1)), "unknown field 'extra'"),
        (_file(_header(schema=2)), "schema 2 is not supported"),
        (_file(_header(engine="tensorflow")), "engine 'tensorflow'"),
        (_file(_header(device="../etc")), "device '../etc' is not a valid id"),
        (_file(_header(captured_at="2026-01-01")), "not an RFC 3339 timestamp"),
        (_file(_header(inputs=[{"name": "x", "datatype": "FP32", "shape": [2**63, 4]}])), "overflows"),
        (_file(_header(inputs=[{"name": "x", "datatype": "FP32", "shape": [0]}] * 65)), "65 tensors"),
        (_file(_header(inputs=[{"name": "x", "datatype": "FP128", "shape": [1]}])), "datatype 'FP128'"),
        (
            _file(json.dumps(_header()).replace('"schema": 1', '"schema": 1, "schema": 1').encode()),
            "duplicate",
        ),
    ],
)
def test_bad_sample_files_are_refused_with_the_reason(file, reason):
    with pytest.raises(SampleError, match=reason):
        ds.decode_sample(file)


def test_encode_refuses_data_that_does_not_match_the_header():
    header = _header()
    with pytest.raises(SampleError, match="take 296 bytes"):
        ds.encode_sample(header, [np.zeros((1, 1, 8, 8), np.float32)])
    with pytest.raises(SampleError, match="FP32 but its array is float64"):
        ds.encode_sample(header, [np.zeros((1, 1, 8, 8)), np.zeros((1, 10), np.float32)])
    with pytest.raises(SampleError, match="take 296 bytes"):
        ds.encode_sample(header, [b"\0" * 256, b"\0" * 39])


# --- exports ---------------------------------------------------------------------------


def test_an_export_round_trips_and_its_digest_is_the_manifests(export):
    path, digest, samples = export
    (name, manifest_bytes), *rest = members_of(path)
    assert name == "manifest.json"
    assert digest == hashlib.sha256(manifest_bytes).hexdigest()
    assert [n for n, _ in rest] == [f"samples/{hashlib.sha256(s).hexdigest()}.bfs" for s in samples]
    for expected in (None, digest, f"sha256:{digest}", digest.upper()):
        snapshot = ds.read_dataset(path, expected_digest=expected)
        assert snapshot.digest == digest
    assert (snapshot.id, snapshot.name) == ("ds-1", "week-1")
    assert snapshot.manifest == json.loads(manifest_bytes)
    assert [s.sha256 for s in snapshot.samples] == [r["sha256"] for r in snapshot.manifest["samples"]]
    for sample, file in zip(snapshot.samples, samples, strict=True):
        want = ds.decode_sample(file)
        np.testing.assert_array_equal(sample.inputs[0].array, want.inputs[0].array)
        assert sample.outputs[0].array.argmax() == want.outputs[0].array.argmax()
    record = snapshot.manifest["samples"][0]
    assert record["bytes"] == len(samples[0])
    assert record["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8]}]


def test_a_manifest_digest_mismatch_is_refused(export):
    path, digest, _ = export
    other = "0" * 64
    with pytest.raises(DatasetError, match=f"digest is {digest}, not the expected {other}"):
        ds.read_dataset(path, expected_digest=other)
    with pytest.raises(DatasetError, match="not 64 hex digits"):
        ds.read_dataset(path, expected_digest="abc")


def test_a_sample_whose_bytes_are_not_its_name_is_refused(export, tmp_path):
    path, _, _ = export
    members = members_of(path)
    name, data = members[1]
    members[1] = (name, data[:-4] + bytes(b ^ 0xFF for b in data[-4:]))
    with pytest.raises(DatasetError, match=f"{name} has SHA-256 .* not the one it is named by"):
        ds.read_dataset(tar_of(tmp_path / "bad.tar", members))


def test_a_sample_the_manifest_does_not_list_there_is_refused(export, tmp_path):
    path, _, _ = export
    members = members_of(path)
    other = digit(9)
    members[2] = (f"samples/{hashlib.sha256(other).hexdigest()}.bfs", other)
    with pytest.raises(DatasetError, match="is where the manifest's sample 1"):
        ds.read_dataset(tar_of(tmp_path / "bad.tar", members))
    reordered = [members_of(path)[i] for i in (0, 2, 1, 3)]
    with pytest.raises(DatasetError, match="is where the manifest's sample 0"):
        ds.read_dataset(tar_of(tmp_path / "reordered.tar", reordered))


def test_missing_and_extra_samples_are_refused(export, tmp_path):
    path, _, _ = export
    members = members_of(path)
    with pytest.raises(DatasetError, match="ends after 2 of the manifest's 3 samples"):
        ds.read_dataset(tar_of(tmp_path / "short.tar", members[:-1]))
    with pytest.raises(DatasetError, match="follows the manifest's 3 samples"):
        ds.read_dataset(tar_of(tmp_path / "long.tar", [*members, members[1]]))


@pytest.mark.parametrize(
    "name",
    [
        "notes.txt",
        "samples/" + "ab" * 32 + ".bin",
        "samples/" + "AB" * 32 + ".bfs",
        "samples/sub/" + "ab" * 32 + ".bfs",
        "data/" + "ab" * 32 + ".bfs",
    ],
)
def test_a_member_outside_samples_is_refused(export, tmp_path, name):
    path, _, _ = export
    members = members_of(path)
    bad = tar_of(tmp_path / "bad.tar", [*members[:2], (name, b"x"), *members[2:]])
    with pytest.raises(DatasetError, match=r"is neither manifest\.json nor samples/<sha256>\.bfs"):
        ds.read_dataset(bad)


@pytest.mark.parametrize(
    "name", ["../evil.bfs", "/etc/passwd", "samples/../../x.bfs", "samples/..\\..\\x.bfs", "C:/x"]
)
def test_path_traversal_is_refused(export, tmp_path, name):
    path, _, _ = export
    members = members_of(path)
    bad = tar_of(tmp_path / "bad.tar", [members[0], (name, b"x"), *members[1:]])
    with pytest.raises(DatasetError, match="path traversal"):
        ds.read_dataset(bad)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (tarfile.SYMTYPE, "is a link"),
        (tarfile.LNKTYPE, "is a link"),
        (tarfile.DIRTYPE, "not a regular file"),
        (tarfile.FIFOTYPE, "not a regular file"),
    ],
)
def test_links_and_other_non_files_are_refused(export, tmp_path, kind, reason):
    path, _, samples = export
    members = members_of(path)
    info = tarfile.TarInfo(f"samples/{hashlib.sha256(samples[0]).hexdigest()}.bfs")
    info.type = kind
    info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    bad = tar_of(tmp_path / "bad.tar", [members[0], info, *members[2:]])
    with pytest.raises(DatasetError, match=reason):
        ds.read_dataset(bad)


def test_oversized_members_are_refused(export):
    path, _, samples = export
    with pytest.raises(DatasetError, match=f"is {len(samples[0])} bytes; the limit is 100"):
        ds.read_dataset(path, max_sample_bytes=100)
    with pytest.raises(DatasetError, match=r"manifest\.json' is .* bytes; the limit is 10"):
        ds.read_dataset(path, max_manifest_bytes=10)
    with pytest.raises(DatasetError, match="holds more than 2000 bytes"):
        ds.read_dataset(path, max_total_bytes=2000)


def test_the_manifest_comes_first_and_is_checked(export, tmp_path):
    path, _, _ = export
    members = members_of(path)
    with pytest.raises(DatasetError, match="first member is 'samples/"):
        ds.read_dataset(tar_of(tmp_path / "late.tar", [*members[1:], members[0]]))
    with pytest.raises(DatasetError, match="empty"):
        ds.read_dataset(tar_of(tmp_path / "empty.tar", []))
    manifest = json.loads(members[0][1])

    def with_manifest(value, name):
        data = value if isinstance(value, bytes) else json.dumps(value).encode()
        return tar_of(tmp_path / name, [("manifest.json", data), *members[1:]])

    with pytest.raises(DatasetError, match="not valid JSON"):
        ds.read_dataset(with_manifest(b"{", "json.tar"))
    with pytest.raises(DatasetError, match="schema 2 is not supported"):
        ds.read_dataset(with_manifest({**manifest, "schema": 2}, "schema.tar"))
    twice = {**manifest, "samples": [manifest["samples"][0]] * 2}
    with pytest.raises(DatasetError, match="is listed twice"):
        ds.read_dataset(with_manifest(twice, "twice.tar"))
    wrong = json.loads(members[0][1])
    wrong["samples"][0]["device"] = "robot-2"
    with pytest.raises(DatasetError, match="the manifest's device 'robot-2' is not the sample's 'robot-1'"):
        ds.read_dataset(with_manifest(wrong, "device.tar"))
    wrong = json.loads(members[0][1])
    wrong["samples"][1]["bytes"] += 1
    with pytest.raises(DatasetError, match="the manifest says"):
        ds.read_dataset(with_manifest(wrong, "bytes.tar"))


def test_a_bad_sample_inside_an_export_is_refused_with_its_name(tmp_path):
    padded = digit(0) + b"\0"
    name = f"samples/{hashlib.sha256(padded).hexdigest()}.bfs"
    record = {
        **ds.manifest_record(digit(0)),
        "sha256": hashlib.sha256(padded).hexdigest(),
        "bytes": len(padded),
    }
    manifest = json.dumps({"schema": 1, "id": "x", "name": "x", "samples": [record]}).encode()
    path = tar_of(tmp_path / "bad.tar", [("manifest.json", manifest), (name, padded)])
    with pytest.raises(SampleError, match=f"{name}: sample tensors take 296 bytes but the file holds 297"):
        ds.read_dataset(path)


def test_what_is_not_a_plain_tar_is_refused(export, tmp_path):
    path, _, _ = export
    (tmp_path / "export.tar.gz").write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(DatasetError, match="not a readable uncompressed tar"):
        ds.read_dataset(tmp_path / "export.tar.gz")
    (tmp_path / "cut.tar").write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DatasetError):
        ds.read_dataset(tmp_path / "cut.tar")
    with pytest.raises(DatasetError, match="not a readable"):
        ds.read_dataset(tmp_path / "missing.tar")


# --- training examples -----------------------------------------------------------------


def test_examples_take_fitting_samples_with_pseudo_labels_and_count_the_rest(tmp_path):
    samples = [
        digit(3),
        digit(4, batch=3, top1=6),
        ds.make_sample([("x", np.zeros((1, 3, 8, 8), np.float32))], [("y", np.zeros((1, 10), np.float32))]),
        ds.make_sample([("x", np.zeros((1, 1, 8, 8), np.float64))], []),
        ds.make_sample([("x", np.zeros((1, 1, 8, 8), np.float32))], []),
        ds.make_sample([("x", np.zeros((1, 1, 8, 8), np.float32))], [("y", np.zeros((1, 5), np.float32))]),
        ds.make_sample([("x", np.zeros((1, 1, 8, 8), np.float32))], [("y", np.zeros((1,), np.int64))]),
        ds.make_sample(
            [("x", np.full((1, 1, 8, 8), np.nan, np.float32))], [("y", np.zeros((1, 10), np.float32))]
        ),
    ]
    ds.write_dataset(tmp_path / "e.tar", samples)
    taken = ds.examples(ds.read_dataset(tmp_path / "e.tar"), (1, 8, 8), 10)
    assert taken.summary() == {
        "used": 2,
        "examples": 4,
        "labelled": {"pseudo": 2},
        "skipped": {
            "first input is FP64, the model takes FP32": 1,
            "first input is not finite": 1,
            "first input shape [1, 3, 8, 8] is not [N, 1, 8, 8]": 1,
            "first output is INT64, not scores": 1,
            "first output shape [1, 5] is not [1, 10]": 1,
            "no output recorded": 1,
        },
    }
    assert taken.y.tolist() == [3, 6, 6, 6]
    assert taken.x.shape == (4, 1, 8, 8)
    assert taken.x.dtype == np.float32


def test_examples_take_labels_from_labels_csv(tmp_path):
    samples = [digit(1), digit(2), digit(3, batch=2)]
    shas = [hashlib.sha256(s).hexdigest() for s in samples]
    ds.write_dataset(tmp_path / "e.tar", samples)
    snapshot = ds.read_dataset(tmp_path / "e.tar")
    csv = tmp_path / "labels.csv"
    csv.write_text(f"sha256,label,note\n{shas[0].upper()},7,checked\n{shas[2]},1,\n")
    labels = ds.read_labels(csv, 10)
    assert labels == {shas[0]: 7, shas[2]: 1}
    taken = ds.examples(snapshot, (1, 8, 8), 10, labels)
    assert taken.y.tolist() == [7]
    assert taken.summary()["skipped"] == {
        "labels.csv gives one label, the sample is a batch of 2": 1,
        "no label in labels.csv": 1,
    }
    with pytest.raises(DatasetError, match="names 1 sample"):
        ds.examples(snapshot, (1, 8, 8), 10, {**labels, "cd" * 32: 1})


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("sha,label\n", "must name the columns sha256 and label"),
        ("sha256,label\nabc,1\n", "line 2: sha256 'abc' is not 64 hex digits"),
        (f"sha256,label\n{'ab' * 32},seven\n", "label 'seven' is not an integer"),
        (f"sha256,label\n{'ab' * 32},10\n", "label 10 is not a class"),
        (f"sha256,label\n{'ab' * 32},1\n{'ab' * 32},2\n", "has two labels"),
    ],
)
def test_bad_labels_are_refused(tmp_path, text, reason):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DatasetError, match=reason):
        ds.read_labels(tmp_path / "labels.csv", 10)
