"""Build a signed bundle from a reviewed variant: model + OOD detectors + runtime policy,
with the review's provenance in the signed manifest.

Provenance rules (issue: release gate):
* the manifest records ``report_digest`` = SHA-256 of the report.json bytes;
* the packaged model must be byte-identical to the variant the report reviewed
  (its SHA-256 is checked), so a report cannot vouch for another file;
* a variant that failed the report's policy is refused unless ``force`` — and then
  the manifest says ``forced: true`` and lists the failed checks, for the device
  operator to see.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hardening.data import Dataset, load_dataset
from hardening.errors import CheckFailed, InputError, ModelError
from hardening.intake import ModelInfo, load_model, make_session, predict_logits, sha256_file
from hardening.paths import resolve
from hardening.prada_calibration import calibrate_model_monitor, monitor_section
from hardening.report.schema import load_report
from runtime_guard.golden import GoldenSet, golden_fields

SMOKE_N = 4
SMOKE_ATOL = 1e-4


@dataclass
class PackageResult:
    out_path: str
    variant: str
    report_digest: str
    forced: bool
    failed_checks: list[str]
    manifest: dict = field(repr=False, default_factory=dict)
    attestation: str | None = None

    def to_dict(self) -> dict:
        return {"out_path": self.out_path, "variant": self.variant, "report_digest": self.report_digest,
                "forced": self.forced, "failed_checks": self.failed_checks, "manifest": self.manifest,
                "attestation": self.attestation}


def write_attestation(bundle_path: str | Path, report_digest: str | None, verdict: dict, signing_key: Any) -> Path:
    """``<bundle>.intoto.json``: in-toto Statement (subject = the bundle file's SHA-256,
    predicate = audit report digest + policy verdict) in a DSSE envelope signed with the
    release key (``runtime_guard.update.attestation``; checked by the device updater)."""
    from runtime_guard.update import attestation

    bundle_path = Path(bundle_path)
    stmt = attestation.statement(bundle_path.name, sha256_file(bundle_path), report_digest, verdict)
    out = bundle_path.with_name(bundle_path.name + ".intoto.json")
    out.write_bytes(attestation.sign(stmt, signing_key))
    return out


def smoke_set(model_path: str | Path, info: ModelInfo, ds: Dataset, n: int = SMOKE_N) -> GoldenSet:
    """Golden inputs (the first ``n`` test inputs) and the packaged model's own outputs on them."""
    x = ds.x[:n].astype(np.float32)
    logits = predict_logits(make_session(model_path), info, x).astype(np.float32)
    return GoldenSet(x, logits.argmax(1).astype(np.int64), logits, SMOKE_ATOL)


def runtime_config(
    info: ModelInfo,
    ds: Dataset,
    detector_meta: dict | None,
    *,
    output_policy: str = "full",
    gate_action: str = "flag",
    rate_limit: str | None = "600/minute",
    overrides: dict | None = None,
    detector_npz: bytes | None = None,
) -> dict:
    """The manifest's ``runtime`` dict, validated by ``GuardConfig``.

    Sanitizer schema from the model input and the data's value range; telemetry's class
    reference from the model's predictions on the calibration split; OOD gate from the
    exported detectors (``off`` when there are none). With detectors, the OOD-score
    reference too: deciles of the calibration scores as ``ood_edges`` and the
    calibration histogram over them, so the ``ood_score`` drift family exists on device.
    """
    from runtime_guard.config import GuardConfig, GuardConfigError

    x_cal, _ = ds.calibration()
    sess = make_session(info.path)
    logits = np.concatenate([predict_logits(sess, info, x_cal[i:i + 256]) for i in range(0, len(x_cal), 256)])
    preds = logits.argmax(1)
    counts = np.bincount(preds, minlength=int(info.num_classes or preds.max() + 1)).astype(float)
    telemetry: dict[str, Any] = {"reference_class_counts": (counts + 0.5).tolist()}  # +0.5: no empty class in PSI
    if detector_meta is not None and detector_npz is not None:
        telemetry.update(_ood_reference(sess, info, x_cal, logits, detector_meta, detector_npz))
    shape = [int(d) if isinstance(d, int) else None for d in info.input_shape[1:]]
    doc: dict[str, Any] = {
        "input": {"sample_shape": None if None in shape else shape, "value_range": list(ds.value_range),
                  "out_of_range": "reject"},
        "rate_limit": {"per_client": rate_limit},
        "anomaly": {"action": gate_action if detector_meta is not None else "off", "detector_meta": detector_meta},
        "output": {"policy": output_policy},
        "telemetry": telemetry,
    }
    for section, values in (overrides or {}).items():
        if not isinstance(values, dict):
            raise InputError(f"runtime override '{section}' must be a table/object")
        doc.setdefault(section, {}).update(values)
    try:
        return GuardConfig.from_dict(doc).to_dict()
    except GuardConfigError as e:
        raise InputError(str(e)) from None


def _ood_reference(sess: Any, info: ModelInfo, x_cal: np.ndarray, logits: np.ndarray,
                   meta: dict, npz: bytes) -> dict[str, Any]:
    """``ood_edges`` (calibration-score deciles) and ``reference_ood_counts`` (+0.5 per bin)."""
    from runtime_guard.anomaly import AnomalyScorer

    scorer = AnomalyScorer.from_bytes(npz, meta)
    feats = None
    if "features" in scorer.needs and info.features_output is not None:
        feats = np.concatenate([sess.run([info.features_output], {info.input_name: x_cal[i:i + 256]})[0]
                                for i in range(0, len(x_cal), 256)])
    scores = np.concatenate([scorer.score(x_cal[i:i + 256], logits[i:i + 256],
                                          None if feats is None else feats[i:i + 256])
                             for i in range(0, len(x_cal), 256)])
    edges = np.unique(np.quantile(scores, np.linspace(0.1, 0.9, 9)))
    if len(edges) == 0:
        return {}
    ref = np.histogram(scores, bins=[-np.inf, *edges.tolist(), np.inf])[0].astype(float) + 0.5
    return {"ood_edges": [float(e) for e in edges], "reference_ood_counts": ref.tolist()}


def _calibrated_monitor(model: Path, info: ModelInfo, ds: Dataset, meta: dict | None, npz: bytes | None,
                        target: float, space: str) -> dict:
    """PRADA + gate-rejection + label-entropy thresholds calibrated for the model and gate that ship."""
    from runtime_guard.anomaly import AnomalyScorer

    scorer = AnomalyScorer.from_bytes(npz, meta) if meta is not None and npz is not None else None
    cal = calibrate_model_monitor(make_session(model), info, ds, scorer, target=target, space=space)
    return monitor_section(cal.config)


def _pick_variant(report: dict, variant: str | None) -> dict:
    names = [v["name"] for v in report["variants"]]
    if variant is None:
        if len(names) != 1:
            raise InputError(f"report has {len(names)} variants ({', '.join(names)}); choose one with --variant")
        variant = names[0]
    for v in report["variants"]:
        if v["name"] == variant:
            return v
    raise InputError(f"variant {variant!r} is not in the report (variants: {', '.join(names)})")


def _admit(model: Path, name: str) -> None:
    """Refuse now what the device's admission check would refuse after deployment."""
    from runtime_guard.admission import admit_model
    from runtime_guard.errors import ModelRejected

    try:
        admit_model(model.read_bytes())
    except ModelRejected as e:
        raise ModelError(f"{model}: variant {name!r} would be rejected on the device ({e})") from None


def _with_fitted_features(model: Path, meta: dict, ds: Dataset, tmp: Path) -> Path:
    """The model the detectors were fitted on: when fit-ood exposed the penultimate tensor by
    graph edit, ship that edit (as output ``features``; logits checked unchanged) so that
    every bundle that verifies also serves."""
    from hardening.ood.graph import add_feature_output

    info = load_model(model)
    edit = add_feature_output(model.read_bytes(), info.input_name, info.logits_output, ds.x[:64],
                              tensor=meta["model"]["features_tensor"], output_name="features")
    shipped = tmp / model.name
    shipped.write_bytes(edit.model_bytes)
    return shipped


def package_variant(
    report_path: str | Path,
    out_path: str | Path,
    *,
    signing_key: Any,
    kek: Any,
    version: int,
    variant: str | None = None,
    model_path: str | Path | None = None,
    data_path: str | Path | None = None,
    expires_in_s: int | None = None,
    force: bool = False,
    output_policy: str = "full",
    gate_action: str = "flag",
    rate_limit: str | None = "600/minute",
    runtime_overrides: dict | None = None,
    model_signature: str | Path | None = None,
    model_signing_key: str | Path | None = None,
    monitor_config: dict | None = None,
    calibrate_monitor: float | None = None,
    monitor_space: str | None = None,
) -> PackageResult:
    """Write a signed, encrypted bundle for one reviewed variant; see the module doc for the rules.

    The extraction monitor ships calibrated when asked: ``monitor_config`` is the output of
    ``edgeward calibrate-monitor`` for this model (or a bare monitor section);
    ``calibrate_monitor`` = a false-flag target calibrates it here, on the data and the
    shipped gate, with PRADA distances in ``monitor_space`` (default ``standardized``). Either
    replaces the fixed PRADA defaults in the signed ``runtime.extraction``.

    Raises ``CheckFailed`` (exit 1) for a variant that failed the policy without ``force``,
    ``InputError``/``ModelError`` (exit 2) for anything that does not match the report.
    """
    from runtime_guard.bundle import write_bundle

    report_path = Path(report_path)
    raw = report_path.read_bytes() if report_path.is_file() else None
    if raw is None:
        raise InputError(f"{report_path}: report not found")
    report = load_report(report_path)
    digest = hashlib.sha256(raw).hexdigest()
    base = report_path.parent
    v = _pick_variant(report, variant)
    name = v["name"]

    failed = [c["id"] for c in report["checks"] if c["status"] == "fail" and c["variant"] in (name, None)]
    if failed and not force:
        raise CheckFailed(
            f"variant {name!r} failed {len(failed)} policy check(s) in {report_path} "
            f"({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}); refusing to package without --force"
        )

    model = Path(model_path) if model_path else resolve(v["path"], base)
    if not model.is_file():
        raise ModelError(f"{model}: model file of variant {name!r} not found (pass --model)")
    got = sha256_file(model)
    if got != v["sha256"]:
        raise ModelError(f"{model}: sha256 {got[:12]}... is not the reviewed variant {name!r} ({v['sha256'][:12]}...)")
    if model_signature is not None or model_signing_key is not None:
        if model_signature is None or model_signing_key is None:
            raise InputError("--model-signature and --model-signing-key go together")
        from hardening.model_signature import verify_model_signature

        verify_model_signature(model, model_signature, model_signing_key)
    info = load_model(model)
    _admit(model, name)

    data = Path(data_path) if data_path else resolve(report["inputs"]["data"]["path"], base)
    if not data.is_file():
        raise InputError(f"{data}: data file recorded in the report not found (pass --data)")
    if data_path is None and sha256_file(data) != report["inputs"]["data"]["sha256"]:
        raise InputError(f"{data}: data file changed since the review (sha256 differs); pass --data explicitly")
    ds = load_dataset(data)

    payloads = {"model": model.read_bytes()}
    meta = None
    det_rel = ((report.get("artifacts") or {}).get("detectors") or {}).get(name)
    if det_rel is not None:
        det = resolve(det_rel, base)
        try:
            meta = json.loads((det / "detectors.json").read_text())
            payloads["detectors.npz"] = (det / "detectors.npz").read_bytes()
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{det}: detectors of variant {name!r} unreadable ({e})") from None
        det_sha = (meta.get("model") or {}).get("sha256")
        if det_sha and det_sha != v["sha256"]:
            raise ModelError(f"{det}: detectors were fitted for another model (sha256 {det_sha[:12]}...)")
    features_added = ((meta or {}).get("model") or {}).get("features_tensor")
    with tempfile.TemporaryDirectory() as tmp:
        if features_added:
            model = _with_fitted_features(model, meta, ds, Path(tmp))  # type: ignore[arg-type]
            info = load_model(model)
            _admit(model, name)
            payloads["model"] = model.read_bytes()
        if monitor_config is not None and calibrate_monitor is not None:
            raise InputError("give either a monitor config or a calibration target, not both")
        if monitor_space is not None and calibrate_monitor is None:
            raise InputError("a monitor space needs a calibration target (--calibrate-monitor)")
        section = None
        if monitor_config is not None:
            section = monitor_section(monitor_config, v["sha256"])
        elif calibrate_monitor is not None:
            section = _calibrated_monitor(model, info, ds, meta, payloads.get("detectors.npz"), calibrate_monitor,
                                          monitor_space or "standardized")
        if section is not None:
            extra = dict(runtime_overrides or {})
            extra["extraction"] = {**(extra.get("extraction") or {}), **section}
            runtime_overrides = extra
        runtime = runtime_config(info, ds, meta, output_policy=output_policy, gate_action=gate_action,
                                 rate_limit=rate_limit, overrides=runtime_overrides,
                                 detector_npz=payloads.get("detectors.npz"))
        golden = smoke_set(model, info, ds)
    fields = {
        "model": {"name": Path(report["inputs"]["model"]["path"]).stem + "-" + name, "variant": name, "kind": v["kind"],
                  "sha256": v["sha256"], "input_name": info.input_name, "num_classes": info.num_classes,
                  "packaged_sha256": hashlib.sha256(payloads["model"]).hexdigest(),
                  "features_added_by_graph_edit": features_added},
        "runtime": runtime,
        "report_digest": digest,
        "forced": bool(failed),
        "review": {"schema_version": report["schema_version"], "passed": not failed, "failed_checks": failed,
                   "headline": report["verdict"]["headline"], "created_at": report["created_at"]},
    }
    fields["smoke_test"], golden_payload = golden_fields(golden)
    payloads.update(golden_payload)
    try:
        manifest = write_bundle(out_path, payloads, fields, signing_key, kek, version, expires_in_s)
    except ValueError as e:  # writer's argument checks (version, expiry, manifest size)
        raise InputError(f"cannot write bundle: {e}") from None
    verdict = {"passed": not failed, "forced": bool(failed), "failed_checks": failed,
               "headline": report["verdict"]["headline"], "variant": name}
    att = write_attestation(out_path, digest, verdict, signing_key)
    return PackageResult(str(out_path), name, digest, bool(failed), failed, manifest, str(att))
