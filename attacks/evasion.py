"""Evasion attack adapters over ``art.attacks.evasion``: one call, one set of settings.

Every attack is described by an ``AttackSpec`` (what access it needs, whether it is
bounded by an epsilon or searches for a minimal perturbation) and run through
``craft``, which fixes seeds, hides ART's progress bars and returns adversarial
inputs. Whether an example is *actually* adversarial is decided by the caller on the
deployed model, never here.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from attacks.apgd import apgd
from attacks.errors import InputError, ModelError

NORMS = {"inf": np.inf, "2": 2}


class SkipAttack(Exception):
    """The attack cannot run on this model/data (the message says why); not an error."""


@dataclass(frozen=True)
class AttackSpec:
    name: str
    access: str  # "gradients" (white-box/transfer/BPDA), "scores" (logits), "labels" (decision only)
    eps_bounded: bool  # False: minimal-perturbation attack, counted where its distance <= eps
    cost: int  # cascade order, cheap first
    description: str


ATTACKS: dict[str, AttackSpec] = {
    s.name: s
    for s in (
        AttackSpec("fgsm", "gradients", True, 0, "Fast Gradient Sign Method (one step)"),
        AttackSpec("pgd", "gradients", True, 1, "Projected Gradient Descent, cross-entropy"),
        AttackSpec("apgd-ce", "gradients", True, 2, "Auto-PGD, cross-entropy loss"),
        AttackSpec("apgd-dlr", "gradients", True, 3, "Auto-PGD, difference-of-logits-ratio loss"),
        AttackSpec("apgd-t", "gradients", True, 4, "Auto-PGD targeted at the top runner-up classes"),
        AttackSpec("deepfool", "gradients", False, 5, "DeepFool minimal L2 perturbation"),
        AttackSpec("square", "scores", True, 6, "Square attack (score-based black-box)"),
        AttackSpec("hsj", "labels", False, 7, "HopSkipJump (decision-based, labels only)"),
    )
}

# Iteration budgets. "quick" is what CI and tests run; "thorough" is for releases.
PROFILES: dict[str, dict[str, dict]] = {
    "quick": {
        "fgsm": {},
        "pgd": {"max_iter": 10, "num_random_init": 1},
        "apgd-ce": {"max_iter": 100, "nb_random_init": 1, "adaptive": True},
        "apgd-dlr": {"max_iter": 100, "nb_random_init": 1, "adaptive": True},
        "apgd-t": {"max_iter": 100, "nb_random_init": 1, "targets": 3, "adaptive": True},
        "deepfool": {"max_iter": 20, "nb_grads": 3},
        "square": {"max_iter": 300, "nb_restarts": 1, "sentinel": 32},
        "hsj": {"max_iter": 3, "max_eval": 100, "init_eval": 10, "init_size": 20, "sentinel": 32},
    },
    "thorough": {
        "fgsm": {},
        "pgd": {"max_iter": 50, "num_random_init": 2},
        "apgd-ce": {"max_iter": 100, "nb_random_init": 2},
        "apgd-dlr": {"max_iter": 100, "nb_random_init": 2},
        "apgd-t": {"max_iter": 100, "nb_random_init": 1, "targets": 3},
        "deepfool": {"max_iter": 100},
        "square": {"max_iter": 2000, "nb_restarts": 1},
        "hsj": {"max_iter": 40, "max_eval": 1000, "init_eval": 100, "init_size": 100},
    },
}
# Which attacks each profile runs by default. Quick: FGSM breaks the easy points for one
# gradient each, PGD's fixed steps get through the flat loss of input-rounding models
# (where APGD's step halving stalls), APGD-CE then APGD-T (targeted DLR, scale-invariant,
# at the top runner-up classes) run on what is left with per-point early stopping, Square
# and HopSkipJump check for masking (sentinel sample first, see
# hardening.robustness.engine). Untargeted DLR and DeepFool added nothing against
# standard AutoAttack (BENCHMARKS.md, issue 14) and stay in the thorough profile.
DEFAULT_ATTACKS: dict[str, tuple[str, ...]] = {
    "quick": ("fgsm", "pgd", "apgd-ce", "apgd-t", "square", "hsj"),
    "thorough": ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "deepfool", "square", "hsj"),
}


#: Square and HopSkipJump search the input space one patch / one boundary step at a time, so
#: the queries they need grow with the input dimension (a 3x96x96 image has 27,648
#: coordinates; the budgets above were set on 8x8 and 12x12 digits). Their iteration budgets
#: are multiplied by sqrt(dim / BUDGET_REFERENCE_DIM), between 1 and BUDGET_MAX_FACTOR.
BUDGET_REFERENCE_DIM = 1024
BUDGET_MAX_FACTOR = 8.0
DIMENSION_SCALED = ("square", "hsj")


def budget_factor(dim: int) -> float:
    return float(min(BUDGET_MAX_FACTOR, max(1.0, math.sqrt(dim / BUDGET_REFERENCE_DIM))))


def scale_budgets(settings: dict[str, dict], dim: int) -> dict[str, dict]:
    """``settings`` with the query-based attacks' iteration budgets scaled to ``dim``."""
    f = budget_factor(dim)
    if f == 1.0:
        return settings
    out = dict(settings)
    for name in DIMENSION_SCALED:
        if name in out and "max_iter" in out[name]:
            out[name] = {**out[name], "max_iter": max(1, int(round(int(out[name]["max_iter"]) * f)))}
    return out


def parse_norm(norm: str | int | float) -> float:
    key = "inf" if norm in (np.inf, "inf", "Linf", "linf") else str(norm).strip()
    if key in ("2.0", "L2", "l2"):
        key = "2"
    if key not in NORMS:
        raise InputError(f"unknown norm {norm!r}; choose 'inf' or '2'")
    return NORMS[key]


def check_attack_names(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise InputError(f"unknown attack name(s) {unknown}; known: {', '.join(ATTACKS)}")
    if not names:
        raise InputError("no attacks selected")
    return tuple(sorted(dict.fromkeys(names), key=lambda n: ATTACKS[n].cost))


def check_profile(profile: str) -> dict[str, dict]:
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    return PROFILES[profile]


def _seed(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def craft(
    name: str,
    estimator,
    x: np.ndarray,
    y: np.ndarray,
    eps: float,
    norm: float,
    settings: dict,
    seed: int = 0,
) -> np.ndarray:
    """Run one ART attack on ``x`` (true labels ``y``) and return candidate adversarials.

    ``eps`` is ignored by minimal-perturbation attacks (``deepfool``, ``hsj``).
    Raises ``SkipAttack`` when the attack does not apply (e.g. DLR needs 3+ classes).
    """
    logging.getLogger("art").setLevel(logging.ERROR)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # ART's Square L2 divides by zero; caller drops NaNs
        try:
            return _craft(name, estimator, x, y, eps, norm, settings, seed)
        except (SkipAttack, InputError):
            raise
        except Exception as e:  # noqa: BLE001 - ART/torch failures become one line naming the attack (exit 2)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ModelError(f"attack '{name}' failed on this model ({type(e).__name__}: {first})") from None


def _craft(name, estimator, x, y, eps, norm, settings, seed):
    from art.attacks.evasion import (
        DeepFool,
        FastGradientMethod,
        HopSkipJump,
        ProjectedGradientDescent,
        SquareAttack,
    )

    if name not in ATTACKS:
        raise InputError(f"unknown attack name {name!r}; known: {', '.join(ATTACKS)}")
    nb_classes = estimator.nb_classes
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) == 0:
        return x.copy()
    _seed(seed)
    s = dict(settings)
    if name == "fgsm":
        atk = FastGradientMethod(estimator, norm=norm, eps=eps, eps_step=eps, batch_size=128)
        return atk.generate(x, y=y)
    if name == "pgd":
        it = int(s["max_iter"])
        atk = ProjectedGradientDescent(
            estimator,
            norm=norm,
            eps=eps,
            eps_step=float(s.get("eps_step_ratio", 2.5 / it)) * eps,
            max_iter=it,
            num_random_init=int(s.get("num_random_init", 0)),
            batch_size=128,
            verbose=False,
        )
        return atk.generate(x, y=y)
    if name in ("apgd-ce", "apgd-dlr"):
        if name == "apgd-dlr" and nb_classes < 3:
            raise SkipAttack("the DLR loss needs at least 3 classes")
        return apgd(estimator.model, x, y, eps, norm, int(s["max_iter"]), estimator.clip_values,
                    loss="ce" if name == "apgd-ce" else "dlr", restarts=int(s["nb_random_init"]), seed=seed,
                    adaptive=bool(s.get("adaptive", False)))
    if name == "apgd-t":
        if nb_classes < 3:
            raise SkipAttack("targeting runner-up classes needs at least 3 classes (untargeted covers 2)")
        if nb_classes == 3:  # the targeted DLR loss needs 4 logits; with 3 the runner-up is the only target
            return apgd(estimator.model, x, y, eps, norm, int(s["max_iter"]), estimator.clip_values, loss="dlr",
                        restarts=int(s["nb_random_init"]), seed=seed, adaptive=bool(s.get("adaptive", False)))
        return _apgd_targeted(estimator, x, y, eps, norm, s, seed)
    if name == "deepfool":
        if not hasattr(estimator, "class_gradient"):
            raise SkipAttack("DeepFool needs class gradients")
        atk = DeepFool(
            estimator,
            max_iter=int(s["max_iter"]),
            epsilon=0.02,  # overshoot, so the point lands past the boundary for the ONNX model too
            nb_grads=int(s.get("nb_grads", 10)),
            batch_size=64,
            verbose=False,
        )
        return atk.generate(x)
    if name == "square":
        shape = x.shape
        if x.ndim != 4:
            if len(estimator.input_shape) != 3:
                raise SkipAttack(
                    "ART's Square attack needs 4-D image input and these flat samples have no (1, h, w) view "
                    "with h, w > 1 (prime feature count)"
                )
            x = x.reshape(len(x), *estimator.input_shape)
        atk = SquareAttack(
            estimator,
            norm=norm,
            eps=eps,
            max_iter=int(s["max_iter"]),
            nb_restarts=int(s["nb_restarts"]),
            p_init=_square_p_init(x.shape[2:], norm),
            batch_size=256,
            verbose=False,
        )
        return atk.generate(x, y=y).reshape(shape)
    # hsj
    atk = HopSkipJump(
        estimator,
        batch_size=256,
        targeted=False,
        norm=norm,
        max_iter=int(s["max_iter"]),
        max_eval=int(s["max_eval"]),
        init_eval=int(s["init_eval"]),
        init_size=int(s["init_size"]),
        verbose=False,
    )
    return atk.generate(x, y=y)


def _square_p_init(hw: tuple[int, ...], norm: float) -> float:
    """ART's first square side is round(sqrt(p*h*w)) and must stay below min(h, w), else
    its sampling fails on small images; shrink the usual 0.8 (L-inf) / 0.1 (L2) to fit."""
    h, w = int(hw[0]), int(hw[1])
    fit = 0.95 * (min(h, w) - 0.5) ** 2 / (h * w)
    return min(0.8 if norm == np.inf else 0.1, fit)


def _apgd_targeted(estimator, x, y, eps, norm, s, seed) -> np.ndarray:
    """APGD-T (targeted DLR) at the ``targets`` highest-scoring wrong classes (AutoAttack's
    APGD-T runs them one after another on what the previous left). Here one batch holds a
    row per (point, target) and a point leaves with all its rows once one row breaks it:
    the same attacks, a third of the iterations' fixed cost for three targets."""
    logits = estimator.predict(x)
    masked = logits.copy()
    masked[np.arange(len(x)), y] = -np.inf
    k = min(int(s["targets"]), estimator.nb_classes - 1)
    order = np.argsort(-masked, axis=1)[:, :k]
    rows = np.repeat(np.arange(len(x)), k)
    cand = apgd(estimator.model, x[rows], y[rows], eps, norm, int(s["max_iter"]), estimator.clip_values,
                loss="dlr", target=order.ravel(), restarts=int(s["nb_random_init"]), seed=seed,
                adaptive=bool(s.get("adaptive", False)), group=rows)
    hit = np.any(cand.reshape(len(rows), -1) != x[rows].reshape(len(rows), -1), axis=1)
    x_adv = x.copy()
    for r in np.flatnonzero(hit)[::-1]:  # the first target that broke a point wins
        x_adv[rows[r]] = cand[r]
    return x_adv
