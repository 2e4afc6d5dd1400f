"""Data-set snapshots exported by botfleet-server: read them (checked) and write them (tests).

An export (``GET /api/v1/datasets/{id}/export``, ``botfleet-server dataset export``) is an
uncompressed tar: ``manifest.json`` first, then ``samples/<sha256>.bfs`` for every sample in
the manifest's order. The data set's digest is the SHA-256 of the exact ``manifest.json``
bytes (the server's ``X-Botfleet-Dataset-Digest``).

:func:`read_dataset` takes nothing on trust. It refuses any member other than those, path
traversal, links and other non-files, oversized members, a missing, extra, repeated or
reordered sample, a sample whose SHA-256 is not its name and its manifest record's, and a
manifest digest other than the one asked for. Each sample file is decoded as
``protocol/src/sample.rs`` ``decode`` does (magic ``BFSAMPL1``, a u32 little-endian header
length of at most 64 KiB, a JSON ``SampleHeader``, then the raw little-endian tensors, whose
lengths must fill the file exactly) and given as numpy arrays. Every failure is a
:class:`DatasetError` that names the member and the reason.

:func:`encode_sample`, :func:`make_sample` and :func:`write_dataset` write the same formats
(the tests' fixtures). :func:`examples` turns a snapshot into training examples for a model.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import struct
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"BFSAMPL1"
SAMPLE_SCHEMA = 1
MANIFEST_SCHEMA = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 64
_USIZE_MAX = 2**64 - 1
_U32_MAX = 2**32 - 1

MANIFEST = "manifest.json"
# Defaults for what one export may hold; read_dataset takes others.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_SAMPLE_BYTES = 64 * 1024 * 1024
MAX_TOTAL_BYTES = 8 * 1024 * 1024 * 1024

# datatype -> numpy dtype (little endian); the element size is the dtype's itemsize.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
ELEMENT_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
RULES = ("sampled", "low_confidence", "out_of_range", "disagreement", "on_demand")
ENGINES = (
    "tract",
    "onnxruntime-cpu",
    "onnxruntime-cuda",
    "onnxruntime-tensorrt",
    "onnxruntime-tensorrt-fp16",
    "onnxruntime-tensorrt-int8",
)
_HEADER_REQUIRED = ("schema", "device", "slot", "model", "engine", "captured_at", "rule", "inputs", "outputs")
_HEADER_OPTIONAL = ("detail", "candidate", "latency_ms", "candidate_outputs")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_SAMPLE_MEMBER = re.compile(r"samples/([0-9a-f]{64})\.bfs")


class DatasetError(ValueError):
    """A data-set export, a sample file or a labels file was refused; the message says why."""


class SampleError(DatasetError):
    """A sample file was refused (the checks of ``protocol/src/sample.rs`` ``decode``)."""


# ---------------------------------------------------------------------------------------
# Sample files


@dataclass(frozen=True)
class Tensor:
    """One tensor of a sample: its header entry and its values."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray

    def spec(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Sample:
    """A decoded sample file: its SHA-256, its header (the JSON object) and its tensors."""

    sha256: str
    header: dict
    inputs: list[Tensor]
    outputs: list[Tensor]
    candidate_outputs: list[Tensor] = field(default_factory=list)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate field {key!r}")
        out[key] = value
    return out


def _strict_json(data: bytes) -> Any:
    """JSON as serde_json reads it for a struct: UTF-8, no repeated fields, no NaN."""

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=constant)


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_id(kind: str, value: Any) -> None:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{kind} {value!r} is not a valid id (ASCII letters, digits, '-', '_', '.'; 1-64)")


def _check_object(where: str, value: Any, fields: set[str]) -> None:
    """``value`` is a JSON object with no field outside ``fields`` (serde's deny_unknown_fields)."""
    if not isinstance(value, dict):
        raise ValueError(f"{where} is not an object")
    unknown = set(value) - fields
    if unknown:
        raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}")


def _check_model(where: str, value: Any) -> None:
    _check_object(where, value, {"version", "release", "sha256"})
    if not isinstance(value.get("version"), str):
        raise ValueError(f"{where}.version is missing or not a string")
    if not _is_int(value.get("release"), 0, _USIZE_MAX):
        raise ValueError(f"{where}.release is missing or not an unsigned integer")
    if not isinstance(value.get("sha256"), str) or not _HEX64.fullmatch(value["sha256"]):
        raise ValueError(f"{where}.sha256 is missing or not 64 lowercase hex digits")


def _check_tensors(where: str, value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise ValueError(f"{where} is not a list")
    for i, t in enumerate(value):
        at = f"{where}[{i}]"
        _check_object(at, t, {"name", "datatype", "shape"})
        if not isinstance(t.get("name"), str):
            raise ValueError(f"{at}.name is missing or not a string")
        if t.get("datatype") not in DTYPES:
            raise ValueError(f"{at}.datatype {t.get('datatype')!r} is not one of {', '.join(DTYPES)}")
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d, 0, _USIZE_MAX) for d in shape):
            raise ValueError(f"{at}.shape is missing or not a list of unsigned integers")
    return value


def _check_header(header: Any) -> None:
    """What serde's ``SampleHeader`` (deny_unknown_fields) takes; raises ValueError."""
    if not isinstance(header, dict):
        raise ValueError("not a JSON object")
    for name in _HEADER_REQUIRED:
        if name not in header:
            raise ValueError(f"missing field {name!r}")
    unknown = set(header) - set(_HEADER_REQUIRED) - set(_HEADER_OPTIONAL)
    if unknown:
        raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
    if not _is_int(header["schema"], 0, _U32_MAX):
        raise ValueError("schema is not an unsigned 32-bit integer")
    _check_id("device", header["device"])
    _check_id("slot", header["slot"])
    _check_model("model", header["model"])
    if header["engine"] not in ENGINES:
        raise ValueError(f"engine {header['engine']!r} is not one of {', '.join(ENGINES)}")
    captured_at = header["captured_at"]
    try:
        if not isinstance(captured_at, str) or datetime.fromisoformat(captured_at.upper()).tzinfo is None:
            raise ValueError
    except ValueError:
        raise ValueError(f"captured_at {captured_at!r} is not an RFC 3339 timestamp") from None
    if header["rule"] not in RULES:
        raise ValueError(f"rule {header['rule']!r} is not one of {', '.join(RULES)}")
    if header.get("detail") is not None and not isinstance(header["detail"], str):
        raise ValueError("detail is not a string")
    if header.get("candidate") is not None:
        _check_model("candidate", header["candidate"])
    latency = header.get("latency_ms")
    if latency is not None and (isinstance(latency, bool) or not isinstance(latency, int | float)):
        raise ValueError("latency_ms is not a number")
    for side in ("inputs", "outputs"):
        _check_tensors(side, header[side])
    _check_tensors("candidate_outputs", header.get("candidate_outputs", []))


def _tensor_specs(header: dict) -> list[dict]:
    """Every tensor in file order: inputs, outputs, then the candidate's outputs."""
    return [*header["inputs"], *header["outputs"], *header.get("candidate_outputs", [])]


def _byte_len(spec: dict) -> int | None:
    """The bytes a tensor's values take, or None when that overflows a u64 (as usize does)."""
    n = 1
    for d in spec["shape"]:
        n *= d
        if n > _USIZE_MAX:
            return None
    n *= ELEMENT_BYTES[spec["datatype"]]
    return n if n <= _USIZE_MAX else None


def _tensor_bytes(header: dict) -> int:
    for side in ("inputs", "outputs", "candidate_outputs"):
        count = len(header.get(side, []))
        if count > MAX_TENSORS:
            raise SampleError(f"sample has {count} tensors on one side; at most {MAX_TENSORS}")
    total = 0
    for spec in _tensor_specs(header):
        n = _byte_len(spec)
        if n is None or total + n > _USIZE_MAX:
            raise SampleError(f"tensor {spec['name'][:64]!r} has a shape whose size overflows")
        total += n
    return total


def decode_header(prefix: bytes) -> tuple[dict, int]:
    """The header of a sample file's first bytes and the file length it implies
    (``sample.rs`` ``decode_header``)."""
    if len(prefix) < len(MAGIC):
        raise SampleError("sample file ends inside its magic")
    if prefix[: len(MAGIC)] != MAGIC:
        raise SampleError("not a sample file (its first bytes are not BFSAMPL1)")
    start = len(MAGIC) + 4
    if len(prefix) < start:
        raise SampleError("sample file ends inside its header length")
    (header_len,) = struct.unpack_from("<I", prefix, len(MAGIC))
    if header_len > MAX_HEADER_BYTES:
        raise SampleError(f"sample header length {header_len} is over the limit of {MAX_HEADER_BYTES} bytes")
    if len(prefix) < start + header_len:
        raise SampleError("sample file ends inside its header")
    try:
        header = _strict_json(prefix[start : start + header_len])
        _check_header(header)
    except ValueError as err:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
        raise SampleError(f"sample header is not valid: {err}") from None
    if header["schema"] != SAMPLE_SCHEMA:
        raise SampleError(
            f"sample schema {header['schema']} is not supported (this build knows {SAMPLE_SCHEMA})"
        )
    return header, start + header_len + _tensor_bytes(header)


def decode_sample(data: bytes) -> Sample:
    """Reads and checks a whole sample file (``sample.rs`` ``decode``): every length must
    match the file exactly, so a truncated or padded file is refused."""
    data = bytes(data)
    header, total = decode_header(data)
    body = _tensor_bytes(header)
    header_end = total - body
    if len(data) != total:
        raise SampleError(
            f"sample tensors take {body} bytes but the file holds {max(0, len(data) - header_end)} "
            "after its header"
        )
    tensors = []
    at = header_end
    for spec in _tensor_specs(header):
        n = _byte_len(spec)
        dtype = DTYPES[spec["datatype"]]
        raw = data[at : at + n]
        if spec["datatype"] == "BOOL":
            # One byte, 0 or 1; decode does not check the byte, so neither does this: nonzero is true.
            array = np.frombuffer(raw, dtype=np.uint8) != 0
        else:
            array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)
        tensors.append(
            Tensor(spec["name"], spec["datatype"], tuple(spec["shape"]), array.reshape(spec["shape"]))
        )
        at += n
    n_in, n_out = len(header["inputs"]), len(header["outputs"])
    return Sample(
        sha256=hashlib.sha256(data).hexdigest(),
        header=header,
        inputs=tensors[:n_in],
        outputs=tensors[n_in : n_in + n_out],
        candidate_outputs=tensors[n_in + n_out :],
    )


def datatype_of(array: np.ndarray) -> str:
    """The sample datatype of a numpy array's dtype."""
    for name, dtype in DTYPES.items():
        if np.dtype(array.dtype).newbyteorder("<") == dtype.newbyteorder("<"):
            return name
    raise SampleError(f"no sample datatype for numpy dtype {array.dtype}")


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BOOL":
        return np.ascontiguousarray(array, dtype=np.bool_).astype(np.uint8).tobytes()
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def encode_sample(header: dict, data: list[bytes | np.ndarray]) -> bytes:
    """Writes a sample file (``sample.rs`` ``encode``): ``data`` holds each tensor's values
    (raw bytes, or an array written as its header entry's datatype) in file order. Refuses a
    header whose tensors do not match ``data``, as :func:`decode_sample` would."""
    try:
        _check_header(header)
    except ValueError as err:
        raise SampleError(f"sample header is not valid: {err}") from None
    json_bytes = json.dumps(header, separators=(",", ":")).encode()
    if len(json_bytes) > MAX_HEADER_BYTES:
        raise SampleError(
            f"sample header length {len(json_bytes)} is over the limit of {MAX_HEADER_BYTES} bytes"
        )
    specs = _tensor_specs(header)
    declared = _tensor_bytes(header)
    raws = []
    for i, d in enumerate(data):
        if isinstance(d, bytes | bytearray):
            raws.append(bytes(d))
            continue
        array = np.asarray(d)
        if i < len(specs) and datatype_of(array) != specs[i]["datatype"]:
            raise SampleError(
                f"tensor {specs[i]['name'][:64]!r} is {specs[i]['datatype']} but its array is {array.dtype}"
            )
        raws.append(_raw(array, datatype_of(array)))
    actual = sum(len(r) for r in raws)
    if len(raws) != len(specs) or any(_byte_len(s) != len(r) for s, r in zip(specs, raws, strict=True)):
        raise SampleError(f"sample tensors take {declared} bytes but the data holds {actual}")
    return MAGIC + struct.pack("<I", len(json_bytes)) + json_bytes + b"".join(raws)


def make_sample(
    inputs: list[tuple[str, np.ndarray]],
    outputs: list[tuple[str, np.ndarray]],
    *,
    candidate_outputs: list[tuple[str, np.ndarray]] = (),
    device: str = "robot-1",
    slot: str = "digits",
    model: dict | None = None,
    engine: str = "tract",
    captured_at: str = "2026-01-01T00:00:00Z",
    rule: str = "sampled",
    **optional: Any,
) -> bytes:
    """A sample file for the named arrays (datatype and shape from each array); ``optional``
    holds ``detail``, ``candidate`` or ``latency_ms``."""

    def specs(named: list[tuple[str, np.ndarray]]) -> list[dict]:
        return [{"name": n, "datatype": datatype_of(a), "shape": list(np.shape(a))} for n, a in named]

    header: dict[str, Any] = {
        "schema": SAMPLE_SCHEMA,
        "device": device,
        "slot": slot,
        "model": model or {"version": "1", "release": 1, "sha256": hashlib.sha256(b"model").hexdigest()},
        "engine": engine,
        "captured_at": captured_at,
        "rule": rule,
        **optional,
        "inputs": specs(inputs),
        "outputs": specs(outputs),
    }
    if candidate_outputs:
        header["candidate_outputs"] = specs(candidate_outputs)
    arrays = [np.asarray(a) for _, a in [*inputs, *outputs, *candidate_outputs]]
    return encode_sample(header, arrays)


# ---------------------------------------------------------------------------------------
# Data-set exports


@dataclass(frozen=True)
class Snapshot:
    """A data-set export read and checked: its digest, manifest and samples (manifest order)."""

    digest: str
    manifest: dict
    samples: list[Sample]

    @property
    def id(self) -> Any:
        return self.manifest.get("id")

    @property
    def name(self) -> Any:
        return self.manifest.get("name")


def normalize_digest(digest: str) -> str:
    """``<64 hex>`` or ``sha256:<64 hex>`` (either case) as 64 lowercase hex digits."""
    value = digest.strip()
    if value.lower().startswith("sha256:"):
        value = value[len("sha256:") :]
    value = value.lower()
    if not _HEX64.fullmatch(value):
        raise DatasetError(f"data set digest {digest!r} is not 64 hex digits (optionally sha256:...)")
    return value


def _check_manifest(manifest: Any) -> list[dict]:
    if not isinstance(manifest, dict):
        raise DatasetError(f"{MANIFEST} is not a JSON object")
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise DatasetError(
            f"{MANIFEST} schema {manifest.get('schema')!r} is not supported (this build knows "
            f"{MANIFEST_SCHEMA})"
        )
    records = manifest.get("samples")
    if not isinstance(records, list):
        raise DatasetError(f"{MANIFEST} has no list of samples")
    seen = set()
    for i, record in enumerate(records):
        at = f"{MANIFEST} sample {i}"
        if not isinstance(record, dict):
            raise DatasetError(f"{at} is not an object")
        sha = record.get("sha256")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise DatasetError(f"{at}: sha256 {sha!r} is not 64 lowercase hex digits")
        if sha in seen:
            raise DatasetError(f"{at}: sample {sha} is listed twice")
        seen.add(sha)
        if not _is_int(record.get("bytes"), 0, _USIZE_MAX):
            raise DatasetError(f"{at}: bytes is missing or not an unsigned integer")
        for side in ("inputs", "outputs"):
            try:
                _check_tensors(side, record.get(side))
            except ValueError as err:
                raise DatasetError(f"{at}: {err}") from None
    return records


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or re.match(r"[A-Za-z]:", name):
        raise DatasetError(f"tar member {name!r}: path traversal (absolute or '..')")
    if member.issym() or member.islnk():
        raise DatasetError(f"tar member {name!r} is a link (to {member.linkname!r}); links are refused")
    if not member.isfile() or member.issparse():
        raise DatasetError(f"tar member {name!r} is not a regular file (type {member.type!r})")
    if name != MANIFEST and not _SAMPLE_MEMBER.fullmatch(name):
        raise DatasetError(f"tar member {name!r} is neither {MANIFEST} nor samples/<sha256>.bfs")


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise DatasetError(f"tar member {member.name!r} is {member.size} bytes; the limit is {limit}")
    f = archive.extractfile(member)
    if f is None:
        raise DatasetError(f"tar member {member.name!r} has no data")
    data = f.read(limit + 1)
    if len(data) != member.size:
        raise DatasetError(
            f"tar member {member.name!r}: read {len(data)} bytes, its header says {member.size}"
        )
    return data


def _matches_record(sample: Sample, record: dict, where: str) -> None:
    """The sample's header says what its manifest record says (fields the record has)."""
    header = {"candidate_outputs": [], **sample.header}
    for key in ("device", "slot", "model", "engine", "rule", "inputs", "outputs", "candidate_outputs"):
        if key in record and record[key] != header[key]:
            raise DatasetError(
                f"{where}: the manifest's {key} {record[key]!r} is not the sample's {header[key]!r}"
            )


def read_dataset(
    path: Path,
    *,
    expected_digest: str | None = None,
    max_manifest_bytes: int = MAX_MANIFEST_BYTES,
    max_sample_bytes: int = MAX_SAMPLE_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> Snapshot:
    """Reads and checks a data-set export (see the module's docstring). Nothing is extracted
    to disk; every member is read into memory within the limits. ``expected_digest`` (hex or
    ``sha256:`` hex), when given, must be the manifest's digest."""
    path = Path(path)
    want = normalize_digest(expected_digest) if expected_digest is not None else None
    limits = (max_manifest_bytes, max_sample_bytes, max_total_bytes)
    try:
        with tarfile.open(path, mode="r:") as archive:
            return _read(archive, want, *limits)
    except DatasetError as err:
        raise type(err)(f"{path}: {err}") from None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DatasetError(f"{path}: not a readable uncompressed tar, or a damaged one ({err})") from None


def _read(
    archive: tarfile.TarFile, want: str | None, max_manifest: int, max_sample: int, max_total: int
) -> Snapshot:
    members = iter(archive.next, None)
    first = next(members, None)
    if first is None:
        raise DatasetError(f"the tar is empty (no {MANIFEST})")
    _check_member(first)
    if first.name != MANIFEST:
        raise DatasetError(f"the first member is {first.name!r}, not {MANIFEST}")
    manifest_bytes = _read_member(archive, first, max_manifest)
    total = len(manifest_bytes)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if want is not None and digest != want:
        raise DatasetError(f"the manifest's digest is {digest}, not the expected {want}")
    try:
        manifest = _strict_json(manifest_bytes)
    except ValueError as err:
        raise DatasetError(f"{MANIFEST} is not valid JSON: {err}") from None
    records = _check_manifest(manifest)
    samples: list[Sample] = []
    for i, member in enumerate(members):
        _check_member(member)
        if i >= len(records):
            raise DatasetError(f"member {member.name!r} follows the manifest's {len(records)} samples")
        record = records[i]
        name = f"samples/{record['sha256']}.bfs"
        if member.name != name:
            raise DatasetError(
                f"member {member.name!r} is where the manifest's sample {i} ({name}) should be"
            )
        data = _read_member(archive, member, max_sample)
        total += len(data)
        if total > max_total:
            raise DatasetError(f"the export holds more than {max_total} bytes")
        actual = hashlib.sha256(data).hexdigest()
        if actual != record["sha256"]:
            raise DatasetError(f"{name} has SHA-256 {actual}, not the one it is named by")
        if len(data) != record["bytes"]:
            raise DatasetError(f"{name} is {len(data)} bytes, the manifest says {record['bytes']}")
        try:
            sample = decode_sample(data)
        except SampleError as err:
            raise SampleError(f"{name}: {err}") from None
        _matches_record(sample, record, name)
        samples.append(sample)
    if len(samples) != len(records):
        raise DatasetError(f"the tar ends after {len(samples)} of the manifest's {len(records)} samples")
    return Snapshot(digest=digest, manifest=manifest, samples=samples)


def manifest_record(data: bytes, received_at: str | None = None) -> dict:
    """The manifest record of a sample file, as the server writes it (its ``SampleRecord``:
    the header's facts, the file's SHA-256 and length, when it arrived)."""
    sample = decode_sample(data)
    header = sample.header
    record = {"sha256": sample.sha256}
    for key in ("device", "slot", "model", "engine", "rule", "detail", "candidate", "captured_at"):
        if header.get(key) is not None:
            record[key] = header[key]
    record["received_at"] = received_at or header["captured_at"]
    if header.get("latency_ms") is not None:
        record["latency_ms"] = header["latency_ms"]
    record.update(bytes=len(data), inputs=header["inputs"], outputs=header["outputs"])
    if header.get("candidate_outputs"):
        record["candidate_outputs"] = header["candidate_outputs"]
    return record


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """An uncompressed ustar archive of ``(name, bytes)`` regular files, in order (no checks)."""
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))


def write_dataset(
    path: Path,
    samples: list[bytes],
    *,
    id: str = "ds-test",
    name: str = "test",
    created_at: str = "2026-01-01T00:00:00Z",
    selection: dict | None = None,
) -> str:
    """Writes a data-set export of the sample files (in the given order), as the server
    does (a pretty-printed manifest ending in a newline, then the files); returns its
    digest."""
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "id": id,
        "name": name,
        "created_at": created_at,
        "selection": selection or {},
        "samples": [manifest_record(s) for s in samples],
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode() + b"\n"
    write_tar(
        path,
        [(MANIFEST, manifest_bytes)] + [(f"samples/{hashlib.sha256(s).hexdigest()}.bfs", s) for s in samples],
    )
    return hashlib.sha256(manifest_bytes).hexdigest()


# ---------------------------------------------------------------------------------------
# Training examples


def read_labels(path: Path, classes: int) -> dict[str, int]:
    """``labels.csv``: a header row with ``sha256`` and ``label`` (other columns ignored),
    then one row per sample: its SHA-256 and its class (0 to ``classes`` - 1)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the labels ({err})") from None
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"sha256", "label"} <= {f.strip() for f in reader.fieldnames}:
        raise DatasetError(f"{path}: the first row must name the columns sha256 and label")
    labels: dict[str, int] = {}
    for row in reader:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str | None)}
        where = f"{path} line {reader.line_num}"
        sha = row.get("sha256", "").lower()
        if not _HEX64.fullmatch(sha):
            raise DatasetError(f"{where}: sha256 {row.get('sha256')!r} is not 64 hex digits")
        try:
            label = int(row.get("label", ""))
        except ValueError:
            raise DatasetError(f"{where}: label {row.get('label')!r} is not an integer") from None
        if not 0 <= label < classes:
            raise DatasetError(f"{where}: label {label} is not a class (0 to {classes - 1})")
        if labels.get(sha, label) != label:
            raise DatasetError(f"{where}: sample {sha} has two labels ({labels[sha]} and {label})")
        labels[sha] = label
    return labels


@dataclass
class Examples:
    """Training examples taken from a snapshot, and what was left out, with why."""

    x: np.ndarray
    y: np.ndarray
    used: int = 0
    labelled: Counter = field(default_factory=Counter)  # "labels.csv" | "pseudo" -> samples
    skipped: Counter = field(default_factory=Counter)  # reason -> samples

    def summary(self) -> dict:
        return {
            "used": self.used,
            "examples": len(self.y),
            "labelled": dict(sorted(self.labelled.items())),
            "skipped": dict(sorted(self.skipped.items())),
        }


def _pseudo_labels(sample: Sample, batch: int, classes: int) -> np.ndarray | str:
    """The serving model's top-1 for each row of the sample's first output, or why not."""
    if not sample.outputs:
        return "no output recorded"
    out = sample.outputs[0]
    if out.datatype not in ("FP16", "FP32", "FP64"):
        return f"first output is {out.datatype}, not scores"
    if out.shape != (batch, classes):
        return f"first output shape {list(out.shape)} is not [{batch}, {classes}]"
    scores = out.array.astype(np.float64)
    if not np.isfinite(scores).all():
        return "first output is not finite"
    return scores.argmax(axis=1).astype(np.int64)


def _example(
    sample: Sample, input_shape: tuple[int, ...], classes: int, labels: dict[str, int] | None
) -> tuple[np.ndarray, np.ndarray, str] | str:
    """One sample's inputs, labels and how it was labelled, or why it is skipped."""
    if not sample.inputs:
        return "no input recorded"
    first = sample.inputs[0]
    if first.datatype != "FP32":
        return f"first input is {first.datatype}, the model takes FP32"
    if len(first.shape) != len(input_shape) + 1 or first.shape[1:] != input_shape:
        return f"first input shape {list(first.shape)} is not [N, {', '.join(map(str, input_shape))}]"
    batch = first.shape[0]
    if batch == 0:
        return "first input is an empty batch"
    if not np.isfinite(first.array).all():
        return "first input is not finite"
    x = first.array.astype(np.float32)
    if labels is None:
        y = _pseudo_labels(sample, batch, classes)
        return y if isinstance(y, str) else (x, y, "pseudo")
    if sample.sha256 not in labels:
        return "no label in labels.csv"
    if batch != 1:
        return f"labels.csv gives one label, the sample is a batch of {batch}"
    return x, np.array([labels[sample.sha256]], np.int64), "labels.csv"


def examples(
    snapshot: Snapshot,
    input_shape: tuple[int, ...],
    classes: int,
    labels: dict[str, int] | None = None,
) -> Examples:
    """The snapshot's samples a model with FP32 input ``[N, *input_shape]`` and ``classes``
    scores can learn from. A sample counts when its first input is FP32 of that shape (its
    batch rows become examples) with finite values. Its label is ``labels[sha256]`` when
    ``labels`` is given (one label per sample, so a batch of 1; a sample it does not name is
    skipped), else the top-1 of the sample's first output, the answer of the model that
    served it: pseudo-labels, i.e. distillation from the fleet's model. Skipped samples are
    counted by reason."""
    result = Examples(x=np.zeros((0, *input_shape), np.float32), y=np.zeros(0, np.int64))
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for sample in snapshot.samples:
        taken = _example(sample, tuple(input_shape), classes, labels)
        if isinstance(taken, str):
            result.skipped[taken] += 1
            continue
        x, y, how = taken
        xs.append(x)
        ys.append(y)
        result.used += 1
        result.labelled[how] += 1
    if labels is not None:
        unknown = set(labels) - {s.sha256 for s in snapshot.samples}
        if unknown:
            raise DatasetError(
                f"labels.csv names {len(unknown)} sample(s) that are not in data set {snapshot.digest}, "
                f"e.g. {sorted(unknown)[0]}"
            )
    if xs:
        result.x = np.ascontiguousarray(np.concatenate(xs))
        result.y = np.ascontiguousarray(np.concatenate(ys))
    return result
