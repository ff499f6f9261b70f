"""The ``.npz`` data format shared by every command.

Required arrays: ``x`` (evaluation inputs) and ``y`` (integer labels).
Optional: ``x_train``/``y_train``, ``x_cal``/``y_cal`` (calibration split for
quantization and OOD thresholds), ``x_thief`` (data an attacker holds) and any
number of ``ood_<family>`` arrays (inputs that are out of distribution).
Files are read with ``allow_pickle=False``: object arrays are refused.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hardening.errors import DataError

_SPLITS = ("", "_train", "_cal")
_KNOWN = {"x", "y", "x_train", "y_train", "x_cal", "y_cal", "x_thief"}


@dataclass
class Dataset:
    """Validated arrays; inputs are float32, labels int64."""

    x: np.ndarray
    y: np.ndarray
    x_train: np.ndarray | None = None
    y_train: np.ndarray | None = None
    x_cal: np.ndarray | None = None
    y_cal: np.ndarray | None = None
    x_thief: np.ndarray | None = None
    ood: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def calibration(self) -> tuple[np.ndarray, np.ndarray]:
        """The calibration split, falling back to train; never the test split."""
        if self.x_cal is not None:
            return self.x_cal, self.y_cal  # type: ignore[return-value]
        if self.x_train is not None:
            return self.x_train, self.y_train  # type: ignore[return-value]
        raise DataError(f"{self.source}: no 'x_cal' or 'x_train' array for calibration")

    @property
    def value_range(self) -> tuple[float, float]:
        """The data's value range over every input array (x, x_train, x_cal): the one
        definition, signed into the bundle's input schema by packaging and used by the
        OOD families and the extraction thieves alike."""
        arrays = [a for a in (self.x, self.x_train, self.x_cal) if a is not None]
        return float(min(a.min() for a in arrays)), float(max(a.max() for a in arrays))


def _check_inputs(name: str, arr: np.ndarray, shape: tuple[int, ...] | None, src: str) -> np.ndarray:
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{src}: array '{name}' has dtype {arr.dtype}, expected a numeric array")
    if arr.ndim < 2:
        raise DataError(f"{src}: array '{name}' has shape {arr.shape}, expected (n, ...features)")
    if arr.shape[0] == 0:
        raise DataError(f"{src}: array '{name}' is empty")
    if shape is not None and tuple(arr.shape[1:]) != shape:
        raise DataError(f"{src}: array '{name}' has sample shape {tuple(arr.shape[1:])}, 'x' has {shape}")
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{src}: array '{name}' has {int(bad.sum())} NaN/Inf values (first at index {first})")
    return arr


def _check_labels(name: str, arr: np.ndarray, n: int, src: str) -> np.ndarray:
    if arr.ndim != 1:
        raise DataError(f"{src}: array '{name}' has shape {arr.shape}, expected ({n},) integer labels")
    if arr.shape[0] != n:
        raise DataError(f"{src}: array '{name}' has {arr.shape[0]} labels for {n} inputs")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(f"{src}: array '{name}' holds non-integer labels")
    elif arr.dtype.kind not in "iu":
        raise DataError(f"{src}: array '{name}' has dtype {arr.dtype}, expected integer labels")
    if arr.min() < 0:
        raise DataError(f"{src}: array '{name}' has negative labels")
    return arr.astype(np.int64)


def load_dataset(path: str | Path) -> Dataset:
    """Read and validate a data file; every problem is a ``DataError`` naming it."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise DataError(f"{src}: data file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle
        raise DataError(f"{src}: unreadable array ({e}); object arrays are not allowed") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{src}: not a valid .npz file ({e})") from None
    return dataset_from_arrays(arrays, src)


def dataset_from_arrays(arrays: dict[str, np.ndarray], src: str = "<arrays>") -> Dataset:
    for req in ("x", "y"):
        if req not in arrays:
            raise DataError(f"{src}: missing required array '{req}' (found: {sorted(arrays) or 'none'})")
    x = _check_inputs("x", arrays["x"], None, src)
    shape = tuple(x.shape[1:])
    ds = Dataset(x=x, y=_check_labels("y", arrays["y"], len(x), src), source=src)
    for suffix in _SPLITS[1:]:
        xs, ys = f"x{suffix}", f"y{suffix}"
        if (xs in arrays) != (ys in arrays):
            raise DataError(f"{src}: '{xs}' and '{ys}' must come together")
        if xs in arrays:
            xa = _check_inputs(xs, arrays[xs], shape, src)
            setattr(ds, xs, xa)
            setattr(ds, ys, _check_labels(ys, arrays[ys], len(xa), src))
    if "x_thief" in arrays:
        ds.x_thief = _check_inputs("x_thief", arrays["x_thief"], shape, src)
    for k, v in arrays.items():
        if k.startswith("ood_"):
            ds.ood[k[4:]] = _check_inputs(k, v, shape, src)
        elif k not in _KNOWN:
            raise DataError(f"{src}: unknown array '{k}' (extra OOD sets must be named 'ood_<family>')")
    return ds


def save_dataset(path: str | Path, ds: Dataset) -> None:
    arrays = {"x": ds.x, "y": ds.y}
    for name in ("x_train", "y_train", "x_cal", "y_cal", "x_thief"):
        v = getattr(ds, name)
        if v is not None:
            arrays[name] = v
    for fam, v in ds.ood.items():
        arrays[f"ood_{fam}"] = v
    np.savez_compressed(path, **arrays)
