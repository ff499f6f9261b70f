"""``edgeward fit-ood`` and ``edgeward audit ood``: fit/calibrate the anomaly gate, then audit it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import typer

from hardening.cli.common import JSON_OPT, console, dumps, handle_errors, print_json, table
from hardening.errors import CheckFailed, DataError


def register(app: typer.Typer, audit: typer.Typer) -> None:
    app.command("fit-ood")(fit_ood_cmd)
    audit.command("ood")(audit_ood_cmd)


def _thr(v: float | None) -> str:
    return "+inf" if v is None else f"{v:.6g}"


@handle_errors
def fit_ood_cmd(
    model: Path = typer.Argument(..., help="ONNX classifier (logits; a 'features' output is added by graph edit if missing)."),
    data: Path = typer.Option(..., "--data", help=".npz with x/y (held-out FRR), x_train/y_train (fit) and x_cal/y_cal (calibrate)."),
    out: Path = typer.Option(..., "--out", help="Folder for detectors.npz + detectors.json."),
    alpha: float = typer.Option(0.05, "--alpha", help="Target false-rejection rate of in-distribution inputs, in (0, 1)."),
    features_tensor: str = typer.Option(None, "--features-tensor", help="Tensor to expose as penultimate features (default: model's 'features' output, else input of the final Gemm/MatMul)."),
    seed: int = typer.Option(0, help="Seed for the calibration split and kNN bank subsampling."),
    slack: float = typer.Option(None, "--slack", help="Guarantee: P(false-rejection rate > alpha + slack) <= delta "
                                "[default: hardening.ood.calibration.DEFAULT_SLACK, 0.01]."),
    delta: float = typer.Option(None, "--delta", help="Allowed probability that a calibration set misses alpha + slack "
                                "[default: DEFAULT_DELTA, 0.1]."),
    input_values: int = typer.Option(None, "--input-values", help="Gate budget: values of the compact input view the "
                                     "input detectors read [default: GateBudget, 256]."),
    matrix_values: int = typer.Option(None, "--matrix-values", help="Gate budget: values of each detector's matrix in the "
                                      "device's per-request product [default: GateBudget, 65536]."),
    json_out: bool = JSON_OPT,
) -> None:
    """Fit OOD detectors, fuse them and calibrate the rejection threshold (PAC conformal).

    The per-request work of the gate is bounded by the budget and recorded in detectors.json.
    Exit 2 if the calibration split is too small for the guarantee at this alpha."""
    from hardening.ood.budget import GateBudget
    from hardening.ood.pipeline import fit_ood

    default = GateBudget()
    budget = GateBudget(input_values or default.input_values, matrix_values or default.matrix_values)
    with console.status("fitting OOD detectors"):
        guarantee = {k: v for k, v in (("slack", slack), ("delta", delta)) if v is not None}
        rep = fit_ood(model, data, out, alpha=alpha, features_tensor=features_tensor, seed=seed, budget=budget, **guarantee)
    if json_out:
        print_json(rep.to_dict())
        return
    rows = [(n, _thr(t), rep.detector_heldout_frr[n], "yes" if n in rep.fused else "no") for n, t in rep.detector_thresholds.items()]
    rows.append(("ensemble", _thr(rep.threshold), rep.heldout_frr, "-"))
    table(f"OOD gate, target FRR {rep.alpha:g} (higher score = more anomalous)", ["detector", "threshold", "held-out FRR", "fused"], rows)
    console.print(
        f"threshold = {rep.conformal_k}-th smallest of {rep.n_threshold} calibration scores, so that "
        f"P(FRR > {rep.alpha + rep.frr_slack:.1%}) <= {rep.frr_delta:.0%}; held-out FRR {rep.heldout_frr:.1%} "
        f"(95% CI {rep.heldout_frr_ci[0]:.1%}-{rep.heldout_frr_ci[1]:.1%}); "
        f"normalisation on {rep.n_norm} other calibration inputs; held-out FRR on {rep.n_heldout} test inputs. "
        f"Per request the gate does {rep.budget['macs_per_request']['total']:,} multiply-adds "
        f"(budget: {budget.input_values} input values, {budget.matrix_values} values per detector matrix). "
        f"Wrote {rep.out_dir}/detectors.npz and detectors.json",
        highlight=False,
    )


def _load_adversarial(path: Path) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: adversarial array file not found") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy/.npz without pickle ({e})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if len(loaded.files) != 1:
                raise DataError(f"{path}: .npz must hold exactly one array, found {loaded.files}")
            loaded = loaded[loaded.files[0]]
    if loaded.dtype.kind not in "fiu" or loaded.ndim < 2 or not np.all(np.isfinite(loaded)):
        raise DataError(f"{path}: adversarial inputs must be a finite numeric (n, ...) array")
    return loaded.astype(np.float32)


@handle_errors
def audit_ood_cmd(
    model: Path = typer.Argument(..., help="The ONNX model the detectors were fitted for."),
    data: Path = typer.Option(..., "--data", help=".npz with x/y (in-distribution reference) and any ood_<family> arrays."),
    detectors: Path = typer.Option(..., "--detectors", help="Folder with detectors.npz + detectors.json from fit-ood."),
    out: Path = typer.Option(..., "--out", help="Folder for ood_audit.json and roc_<family>.png."),
    torch_source: Path = typer.Option(None, "--torch-source", help="Float PyTorch source: adds an FGSM family (ART)."),
    adversarial: Path = typer.Option(None, "--adversarial", help=".npy/.npz of adversarial inputs (e.g. from the robustness audit)."),
    adv_eps: float = typer.Option(0.3, "--adv-eps", help="FGSM epsilon as a fraction of the data's value range."),
    n_synthetic: int = typer.Option(500, "--n-synthetic", min=10, help="Inputs per synthetic family (noise, patches)."),
    min_auroc: float = typer.Option(None, "--min-auroc", help="Exit 1 if the ensemble's AUROC is below this on any family."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the ROC PNGs."),
    seed: int = typer.Option(0, help="Seed for synthetic families."),
    json_out: bool = JSON_OPT,
) -> None:
    """Evaluate every detector and the fused gate on OOD families (OOD = positive class)."""
    from hardening.ood.pipeline import audit_ood

    adv = _load_adversarial(adversarial) if adversarial is not None else None
    with console.status("auditing OOD gate") as status:
        res = audit_ood(model, data, detectors, out, torch_source=str(torch_source) if torch_source else None,
                        adversarial=adv, adv_eps=adv_eps, n_synthetic=n_synthetic, seed=seed, plots=not no_plots,
                        progress=lambda m: status.update(m))
    (Path(out) / "ood_audit.json").write_text(dumps(res.to_dict()))
    if json_out:
        print_json(res.to_dict())
    else:
        dets, fams = res.detectors, res.families
        table("AUROC (OOD = positive)", ["family", *dets], [(f, *[res.get(f, d).auroc for d in dets]) for f in fams])
        table(f"accepted@FRR (share of OOD let through at target FRR {res.alpha:g})", ["family", *dets],
              [(f, *[res.get(f, d).accepted_at_frr for d in dets]) for f in fams])
        table("achieved FRR on in-distribution x", ["detector", "FRR"], list(res.id_frr.items()))
        console.print(f"wrote {Path(out) / 'ood_audit.json'} and {len(res.plots)} ROC plots", highlight=False)
    if min_auroc is not None:
        bad = [f"{f} ({res.get(f).auroc:.3f})" for f in res.families if res.get(f).auroc < min_auroc]
        if bad:
            raise CheckFailed(f"ensemble AUROC below {min_auroc} on: {', '.join(bad)}")
