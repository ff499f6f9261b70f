"""OOD evaluation families: what the gate should reject, generated in the data's value range.

- ``uniform`` / ``gaussian`` noise (Gaussian centred mid-range, sd = range/4, clipped)
- ``patches``: grayscale patches of scikit-learn's sample photos, resized to the
  input (flat inputs get flattened patches of the right length)
- ``inverted`` (lo + hi - x) and ``contrast`` (x squeezed to 40% contrast around mid-range)
- ``nonadaptive_fgsm_eps<e>``: FGSM examples from ART on the float torch source (optional;
  an attacker who does not know the gate, labelled so) and
  ``adversarial``: a user-supplied array (e.g. from the robustness audit)
- every ``ood_<family>`` array in the user's ``.npz`` (e.g. ``heldout`` in the digits demo)
"""

from __future__ import annotations

import math

import numpy as np

from hardening.data import Dataset
from hardening.errors import DataError

CONTRAST = 0.4


def value_range(ds: Dataset) -> tuple[float, float]:
    """``ds.value_range``, refused when the inputs are constant."""
    lo, hi = ds.value_range
    if not hi > lo:
        raise DataError(f"{ds.source}: inputs are constant ({lo}); cannot build OOD families")
    return lo, hi


def _patch_grid(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 3:  # C, H, W
        return shape[1], shape[2]
    d = int(np.prod(shape))
    h = max(1, int(math.isqrt(d)))
    return h, math.ceil(d / h)


def natural_patches(n: int, sample_shape: tuple[int, ...], lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    """Random grayscale crops of sklearn's sample images, resized and scaled to [lo, hi]."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    imgs = [np.asarray(Image.fromarray(im).convert("L"), dtype=np.float32) / 255.0 for im in load_sample_images().images]
    h, w = _patch_grid(sample_shape)
    d = int(np.prod(sample_shape))
    out = np.empty((n, d), dtype=np.float32)
    for i in range(n):
        im = imgs[rng.integers(len(imgs))]
        size = int(rng.integers(max(h, w), min(im.shape) // 4))
        r, c = int(rng.integers(0, im.shape[0] - size)), int(rng.integers(0, im.shape[1] - size))
        crop = Image.fromarray(im[r : r + size, c : c + size]).resize((w, h), Image.BILINEAR)
        patch = np.asarray(crop, dtype=np.float32)
        if len(sample_shape) == 3:
            out[i] = np.broadcast_to(patch, sample_shape).ravel()
        else:
            out[i] = patch.ravel()[:d]
    return (lo + out * (hi - lo)).reshape((n, *sample_shape)).astype(np.float32)


def synthetic_families(ds: Dataset, n: int = 500, seed: int = 0) -> dict[str, np.ndarray]:
    lo, hi = value_range(ds)
    mid, span = (lo + hi) / 2, hi - lo
    shape = ds.sample_shape
    rng = np.random.default_rng(seed)
    return {
        "uniform": rng.uniform(lo, hi, (n, *shape)).astype(np.float32),
        "gaussian": np.clip(rng.normal(mid, span / 4, (n, *shape)), lo, hi).astype(np.float32),
        "patches": natural_patches(n, shape, lo, hi, rng),
        "inverted": (lo + hi - ds.x).astype(np.float32),
        "contrast": (mid + (ds.x - mid) * CONTRAST).astype(np.float32),
    }


def fgsm_family(torch_source: str, ds: Dataset, eps: float, num_classes: int) -> np.ndarray:
    """FGSM (ART) on the float torch model; ``eps`` is a fraction of the data's value range."""
    import torch
    from art.attacks.evasion import FastGradientMethod
    from art.estimators.classification import PyTorchClassifier

    from hardening.torch_source import load_torch_source
    from hardening.zoo import LogitsOnly

    lo, hi = value_range(ds)
    clf = PyTorchClassifier(
        LogitsOnly(load_torch_source(torch_source)),
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=ds.sample_shape,
        nb_classes=num_classes,
        clip_values=(lo, hi),
    )
    return FastGradientMethod(clf, eps=eps * (hi - lo)).generate(ds.x, y=ds.y).astype(np.float32)


def checked_adversarial(ds: Dataset, adversarial: np.ndarray) -> np.ndarray:
    """An adversarial family of the data's sample shape, as float32."""
    if tuple(adversarial.shape[1:]) != ds.sample_shape:
        raise DataError(f"adversarial array has sample shape {adversarial.shape[1:]}, data has {ds.sample_shape}")
    return adversarial.astype(np.float32, copy=False)


def build_families(
    ds: Dataset,
    *,
    num_classes: int,
    torch_source: str | None = None,
    adversarial: np.ndarray | None = None,
    adversarial_name: str = "adversarial",
    adv_eps: float = 0.3,
    n: int = 500,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """All families for this data set; user ``ood_*`` arrays come first under their own names."""
    fams = dict(ds.ood)
    for name, arr in synthetic_families(ds, n=n, seed=seed).items():
        fams.setdefault(name, arr)
    if adversarial is not None:
        fams[adversarial_name] = checked_adversarial(ds, adversarial)
    if torch_source is not None:
        if not 0 < adv_eps <= 1:
            raise DataError(f"--adv-eps must be in (0, 1] (fraction of the value range), got {adv_eps}")
        fams[f"nonadaptive_fgsm_eps{adv_eps:g}"] = fgsm_family(torch_source, ds, adv_eps, num_classes)
    return fams
