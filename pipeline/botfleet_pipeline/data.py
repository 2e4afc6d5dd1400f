"""The data set: scikit-learn's digits, split once per seed and saved with the model.

``load_digits`` ships inside scikit-learn (1,797 grey 8x8 images, 10 classes), so the
pipeline runs offline. Pixels (0..16) are scaled to 0..1 and shaped ``[N, 1, 8, 8]``.
The split is stratified and depends only on the seed; the arrays are saved as
``dataset.npz`` next to the model so that quantization, evaluation and the on-device gate
use exactly the same held-out set. Its digest (SHA-256 over names, dtypes, shapes and
bytes of the arrays, in a fixed order) goes into every metrics file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARRAYS = ("x_train", "y_train", "x_calib", "y_calib", "x_eval", "y_eval")
PIXEL_MAX = 16.0
EVAL_COUNT = 360
CALIB_COUNT = 180


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    y_calib: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    seed: int

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAYS}

    def digest(self) -> str:
        return digest_arrays(self.arrays())

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "calib": len(self.y_calib), "eval": len(self.y_eval)}


def digest_arrays(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name} {a.dtype.str} {list(a.shape)}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def make_split(seed: int = 0, eval_count: int = EVAL_COUNT, calib_count: int = CALIB_COUNT) -> Dataset:
    """Loads digits and splits it into train / calibration / held-out evaluation sets."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(PIXEL_MAX))[:, None, :, :]
    y = digits.target.astype(np.int64)
    rest_x, x_eval, rest_y, y_eval = train_test_split(
        x, y, test_size=eval_count, stratify=y, random_state=seed
    )
    x_train, x_calib, y_train, y_calib = train_test_split(
        rest_x, rest_y, test_size=calib_count, stratify=rest_y, random_state=seed + 1
    )
    return Dataset(
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_calib=np.ascontiguousarray(x_calib),
        y_calib=np.ascontiguousarray(y_calib),
        x_eval=np.ascontiguousarray(x_eval),
        y_eval=np.ascontiguousarray(y_eval),
        seed=seed,
    )


def save(dataset: Dataset, path: Path) -> None:
    np.savez(path, seed=np.int64(dataset.seed), **dataset.arrays())


def load(path: Path, expected_digest: str | None = None) -> Dataset:
    with np.load(path) as f:
        arrays = {name: f[name] for name in ARRAYS}
        seed = int(f["seed"])
    dataset = Dataset(seed=seed, **arrays)
    if expected_digest is not None and dataset.digest() != expected_digest:
        raise ValueError(f"{path}: data set digest {dataset.digest()} != expected {expected_digest}")
    return dataset
