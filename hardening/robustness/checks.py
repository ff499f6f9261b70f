"""Self-checks that catch a broken or fooled audit, reported as ``Finding`` objects.

* sanity: at a huge epsilon robust accuracy must fall to about zero, else the attacks
  (not the model) are broken;
* gradients: zero or non-finite input gradients mean white-box attacks are blind;
* black-box/transfer beating white-box on the same model signals gradient masking
  (Athalye et al. 2018);
* a compressed variant that looks more robust than its float parent only under gradient
  attacks is likely masking, not robust;
* more iterations must not raise robust accuracy, and must have stopped lowering it
  (else every surviving point is re-attacked with more, or the figure is an upper bound).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from attacks.estimators import margin_input_gradients
from attacks.evasion import craft
from hardening.robustness.engine import GRADIENT_FAMILIES, Target, finite_or_clean, run_cascade
from hardening.robustness.results import Finding, VariantResult
from hardening.robustness.stats import project, wilson_interval

SANITY_MAX_ROBUST = 0.1  # robust accuracy allowed at the sanity epsilon
BEATS_MIN_FRACTION = 0.05  # share of all points a later family may add before we call it masking
BEATS_MIN_POINTS = 2


def check_gradients(module: nn.Module, x: np.ndarray, y: np.ndarray, name: str) -> tuple[dict, list[Finding]]:
    g = margin_input_gradients(module, x, y).reshape(len(x), -1)
    nonfinite = int((~np.isfinite(g)).any(axis=1).sum())
    zero = int((np.abs(np.nan_to_num(g)).max(axis=1) == 0).sum())
    info = {"points": len(x), "zero": zero, "nonfinite": nonfinite}
    out = []
    if zero:
        out.append(
            Finding(
                "high",
                "ZERO_GRADIENTS",
                f"{zero}/{len(x)} points have an exactly zero input gradient: gradient attacks are blind "
                "(non-differentiable layer such as rounding)",
                name,
            )
        )
    if nonfinite:
        out.append(Finding("high", "NONFINITE_GRADIENTS", f"{nonfinite}/{len(x)} points have NaN/Inf gradients", name))
    return info, out


def check_sanity(
    target: Target, x: np.ndarray, y: np.ndarray, eps: float, norm: float, settings: dict, seed: int, name: str
) -> tuple[dict, list[Finding]]:
    res = run_cascade(target, x, y, [eps], norm, settings, seed).eps[0]
    info = {"eps": eps, "points": len(x), "robust_accuracy": res.robust_accuracy}
    if res.robust_accuracy > SANITY_MAX_ROBUST:
        return info, [
            Finding(
                "high",
                "ATTACK_BROKEN",
                f"robust accuracy is {res.robust_accuracy:.2f} at the sanity epsilon {eps:g} (expected ~0): "
                "the attacks do not work on this model, its robust numbers are upper bounds at best",
                name,
            )
        ]
    return info, []


ITER_MULTS = (1, 2, 4)  # always run; then doubling continues while robust accuracy still falls
ITER_MAX_MULT = 16


def iteration_settings(stage, base: dict, mult: int) -> dict:
    s = dict(base, max_iter=int(base["max_iter"]) * mult)
    if stage.attack == "pgd":  # fixed step size: the longer run extends the shorter one
        s.update(num_random_init=0, eps_step_ratio=2.5 / int(base["max_iter"]))
    return s


def main_iterative_stage(target: Target):
    """The attack whose budget the iteration check doubles: the first of APGD-CE, PGD, Square."""
    for attack in ("apgd-ce", "pgd", "square"):
        stage = next((s for s in target.stages if s.attack == attack), None)
        if stage is not None:
            return stage
    return None


def check_iterations(
    target: Target, x: np.ndarray, y: np.ndarray, eps: float, norm: float, settings: dict, seed: int, name: str
) -> tuple[dict, list[Finding]]:
    """Run the main iterative attack with 1x, 2x and 4x its iterations, then keep doubling
    (up to ``ITER_MAX_MULT``) while robust accuracy still falls.

    More iterations doing *worse* (beyond one point of slack: PGD returns its last, not
    its best, iterate) means unstable or masked gradients. More iterations still doing
    *better* means the budget had not converged: ``converged_at`` is the first multiplier
    a doubling no longer improves on (the audit then re-attacks every surviving point with
    it), and a run still falling at ``ITER_MAX_MULT`` makes the figure an upper bound.
    """
    lo, hi = target.clip_values
    stage = main_iterative_stage(target)
    if stage is None:
        return {"skipped": "no apgd-ce, pgd or square stage"}, []
    base = settings[stage.attack]
    mults: list[int] = []
    robust: list[float] = []
    cand = x
    mult = 1
    while mult <= ITER_MAX_MULT:
        s = iteration_settings(stage, base, mult)
        cand = finite_or_clean(craft(stage.attack, stage.estimator, x, y, eps, norm, s, seed), x)
        cand = project(cand, x, eps, norm, lo, hi)
        still = target.ort_fn.labels(cand) == y
        mults.append(mult)
        robust.append(float(np.mean(still)))
        if mult >= ITER_MULTS[-1] and robust[-1] >= robust[-2] - 1e-9:
            break  # the last doubling found nothing more
        mult *= 2
    falling = [robust[i + 1] < robust[i] - 1e-9 for i in range(len(robust) - 1)]
    last_fall = max((i for i, f in enumerate(falling) if f), default=-1)
    converged_at = None if falling[-1] else mults[last_fall + 1]  # no doubling after it found more
    info = {"attack": f"{stage.family}/{stage.attack}", "eps": eps, "points": len(x), "multipliers": mults,
            "robust": robust, "max_iter": int(base["max_iter"]), "converged": converged_at is not None,
            "converged_at": converged_at, "broken_by_long_run": np.flatnonzero(~still).tolist()}
    info["_adversarial"] = cand  # the longest run's points, for check_convergence (not serialised)
    out = []
    if max(robust[1:]) > robust[0] + 1.0 / len(x) + 1e-9:
        out.append(Finding(
            "warning", "MORE_ITERATIONS_WORSE",
            f"{stage.attack} with more iterations left up to {max(robust[1:]):.2f} robust vs {robust[0]:.2f}: "
            "the optimisation is unstable (noisy or masked gradients)", name))
    if converged_at is None:
        out.append(Finding(
            "high", "ITERATIONS_NOT_CONVERGED",
            f"{info['attack']}: robust accuracy kept falling each time its {base['max_iter']} iterations were "
            f"doubled, up to {mults[-1]}x ({' -> '.join(f'{r:.2f}' for r in robust)} on {len(x)} points at eps "
            f"{eps:g}); every surviving point is re-attacked at {mults[-1]}x, and the figure is an upper bound",
            name))
    elif converged_at > 1:
        out.append(Finding(
            "warning", "ITERATIONS_ESCALATED",
            f"{info['attack']}: robust accuracy still fell when its {base['max_iter']} iterations were doubled "
            f"({' -> '.join(f'{r:.2f}' for r in robust)} at {'/'.join(f'{m}x' for m in mults)} on {len(x)} points "
            f"at eps {eps:g}); it stopped falling at {converged_at}x, so every surviving point is re-attacked "
            f"with {converged_at}x iterations", name))
    return info, out


def escalation_multiplier(info: dict) -> int:
    """Iteration multiplier every surviving point must be re-attacked with (1: none)."""
    if not info or "robust" not in info:
        return 1
    return int(info["converged_at"] or info["multipliers"][-1])


def recount(v: VariantResult) -> None:
    """Per-epsilon robust counts from the examples, after a check counted more points broken."""
    for e in v.eps:
        robust = sum(1 for ex in v.examples if ex.correct
                     and (ex.broken_at_eps is None or ex.broken_at_eps > e.eps * (1 + 1e-9)))
        if robust != e.robust:
            e.robust, e.robust_accuracy = robust, robust / e.n
            e.ci_low, e.ci_high = wilson_interval(robust, e.n)


def check_convergence(v: VariantResult, rows: np.ndarray, info: dict, x: np.ndarray, norm: float) -> list[Finding]:
    """Points the whole cascade left standing at ``info["eps"]`` that the 4x-iteration run of
    its main attack broke: the cascade had not converged. Those points are counted as broken
    (the adversarial examples are real, judged on the deployed session), and a high finding
    says the figure elsewhere is likely overestimated too."""
    eps = info.get("eps")
    adv = info.pop("_adversarial", None)
    if adv is None or eps is None:
        return []
    newly = []
    for j in info.get("broken_by_long_run", []):
        ex = v.examples[int(rows[j])]
        if ex.correct and (ex.broken_at_eps is None or ex.broken_at_eps > eps):
            dist = float(np.linalg.norm((adv[j] - x[j]).ravel(), ord=norm))
            ex.broken_at_eps, ex.broken_by, ex.norm = float(eps), f"long-run/{info['attack']}", dist
            ex.robust_beyond = None
            ex.min_distance = dist if ex.min_distance is None else min(ex.min_distance, dist)
            newly.append(int(rows[j]))
    info["cascade_missed"] = newly
    if not newly:
        return []
    return [Finding(
        "high", "NOT_CONVERGED",
        f"{info['attack']} with 4x iterations broke {len(newly)} of {len(rows)} checked points at eps {eps:g} "
        "that the whole cascade left standing; they are now counted as broken, but the robust accuracy "
        "on the other points is likely overestimated too (raise the attack budget: --profile thorough)",
        v.name,
    )]


def check_family_gaps(v: VariantResult) -> list[Finding]:
    """Later families (transfer, black-box, decision) breaking points that the first,
    white-box family could not at the same epsilon: the white-box attack is being fooled."""
    first = v.families[0] if v.families else None
    if first not in ("white-box", "bpda") or not v.eps:
        return []
    limit = max(BEATS_MIN_POINTS, int(np.ceil(BEATS_MIN_FRACTION * v.eps[0].n)))
    worst: dict[str, tuple[int, float]] = {}
    for e in sorted({r.eps for r in v.attacks}):
        groups = [("transfer", ("transfer",)), ("black-box", ("black-box", "decision"))]
        if first == "white-box":
            groups.append(("bpda", ("bpda",)))  # straight-through rounding beating plain gradients
        for key, fams in groups:
            k = sum(r.broken for r in v.attacks if r.eps == e and r.family in fams)
            if k > worst.get(key, (0, e))[0]:
                worst[key] = (k, e)
    out = []
    for key, (k, eps) in worst.items():
        if k >= limit:
            code = f"{key.upper().replace('-', '')}_BEATS_WHITEBOX"
            out.append(
                Finding(
                    "high",
                    code,
                    f"at eps {eps:g}, {key} attacks broke {k} points that {first} gradient attacks could not: "
                    "gradient masking likely; the reported number already includes these attacks",
                    v.name,
                )
            )
    return out


CE_ATTACKS = ("fgsm", "pgd", "apgd-ce")
SCALE_FREE_ATTACKS = ("apgd-dlr", "apgd-t", "deepfool")
MASKING_CODES = ("ZERO_GRADIENTS", "NONFINITE_GRADIENTS", "BLACKBOX_BEATS_WHITEBOX", "ATTACK_BROKEN")


def check_losses(v: VariantResult, masked: tuple[str, ...] = ()) -> list[Finding]:
    """Compare losses inside each gradient family: scale-invariant attacks (DLR, targeted,
    DeepFool) breaking points the cross-entropy attacks left, on the same gradients, means
    cross-entropy is blind there (saturated softmax, huge logits). The figure already
    includes them; the finding says the CE numbers alone would have over-reported.
    ``masked``: families whose gradients are already known to be zero (every loss is blind
    there; what breaks points is the random start, not the loss)."""
    if not v.eps:
        return []
    limit = max(BEATS_MIN_POINTS, int(np.ceil(BEATS_MIN_FRACTION * v.eps[0].n)))
    out = []
    for fam in ("white-box", "bpda"):
        if fam in masked:
            continue
        runs = [r for r in v.attacks if r.family == fam and r.skipped is None]
        ce = {r.attack for r in runs if r.attack in CE_ATTACKS}
        for e in sorted({r.eps for r in runs}):
            k = sum(r.broken for r in runs if r.eps == e and r.attack in SCALE_FREE_ATTACKS)
            if ce and k >= limit:
                by = sorted({r.attack for r in runs if r.eps == e and r.attack in SCALE_FREE_ATTACKS and r.broken})
                out.append(Finding(
                    "warning", "CE_LOSS_BLIND",
                    f"at eps {e:g}, {'/'.join(by)} broke {k} points that {', '.join(sorted(ce))} ({fam}) could not "
                    "with the same gradients: the cross-entropy loss is blind on this model (saturated or huge "
                    "logits); the reported number includes the scale-invariant attacks", v.name))
                break
    return out


def upper_bound_reason(v: VariantResult, findings: list[Finding], has_gradient_route: bool,
                       restored: str | None) -> str | None:
    """Why the figure is only an upper bound, or None when the audit can stand behind it.

    Masking flagged (zero/non-finite gradients, black-box beating every gradient family,
    attacks failing at the sanity epsilon) with no straight-through route that restored
    gradients, or no gradient route at all."""
    if not has_gradient_route:
        return "no gradient route reached the model (score- and decision-based attacks only)"
    mine = {f.code for f in findings if f.variant == v.name}
    if mine & {"ZERO_GRADIENTS", "NONFINITE_GRADIENTS"} and not restored:
        return "gradients are masked and no straight-through route restored them"
    if "BLACKBOX_BEATS_WHITEBOX" in mine:
        return "black-box attacks broke points every gradient route missed (gradient masking)"
    if "ATTACK_BROKEN" in mine:
        return "the attacks did not break the model at the sanity epsilon"
    if "ITERATIONS_NOT_CONVERGED" in mine:
        return "robust accuracy was still falling when the attack's iterations were doubled (not converged)"
    return None


def check_against_parent(v: VariantResult, parent: VariantResult, margin: float = 0.1) -> list[Finding]:
    """Compressed variant more robust than its parent under gradient attacks only."""
    out = []
    for e in v.eps:
        pe = parent.robust_at(e.eps)
        if abs(pe.eps - e.eps) > 1e-12:
            continue
        grad_v = min((val for f, val in e.robust_after_family.items() if f in GRADIENT_FAMILIES), default=None)
        grad_p = min((val for f, val in pe.robust_after_family.items() if f in GRADIENT_FAMILIES), default=None)
        if grad_v is None or grad_p is None:
            continue
        if grad_v - grad_p >= margin and e.robust_accuracy - pe.robust_accuracy < margin / 2:
            out.append(
                Finding(
                    "warning",
                    "COMPRESSED_MASKING",
                    f"at eps {e.eps:g} '{v.name}' looks more robust than '{parent.name}' under gradient attacks "
                    f"({grad_v:.2f} vs {grad_p:.2f}) but not under all attacks ({e.robust_accuracy:.2f} vs "
                    f"{pe.robust_accuracy:.2f}): likely gradient masking from compression",
                    v.name,
                )
            )
            break
    return out
