"""``edgeward keygen``, ``package``, ``verify`` and ``inspect``: signed, encrypted model bundles."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

from hardening.cli.common import JSON_OPT, handle_errors, out, print_json, table
from hardening.errors import CheckFailed, InputError
from runtime_guard.output_policy import OUTPUT_POLICIES

KEY_FILES = ("signing.pem", "signing.pub.pem", "kek.key")


def register(app: typer.Typer, audit: typer.Typer) -> None:
    app.command("keygen")(keygen)
    app.command("package")(package)
    app.command("verify")(verify)
    app.command("inspect")(inspect)


def _key_error(exc: Exception) -> InputError:
    check = getattr(exc, "check", None)
    return InputError(f"{check}: {exc}" if check else str(exc))


def _kek(key_file: Optional[Path], kek_env: Optional[str], passphrase_env: Optional[str]) -> Any:
    from runtime_guard.bundle import load_kek
    from runtime_guard.errors import BundleError

    given = [x is not None for x in (key_file, kek_env, passphrase_env)]
    if sum(given) != 1:
        raise InputError("give exactly one of --key-file, --kek-env or --passphrase-env")
    try:
        if passphrase_env is not None:
            pw = os.environ.get(passphrase_env)
            if not pw:
                raise InputError(f"environment variable {passphrase_env} is not set")
            return load_kek(passphrase=pw)
        return load_kek(file=key_file, env=kek_env)
    except BundleError as e:
        raise _key_error(e) from None


KEY_FILE_OPT = typer.Option(None, "--key-file", help="KEK file (0600; 32 bytes raw, hex or base64).")
KEK_ENV_OPT = typer.Option(None, "--kek-env", help="Environment variable holding the KEK (hex or base64).")
PASS_ENV_OPT = typer.Option(None, "--passphrase-env", help="Environment variable holding a KEK passphrase (scrypt).")


@handle_errors
def keygen(
    out_dir: Path = typer.Option(..., "--out", help="Folder for signing.pem (0600), signing.pub.pem and kek.key (0600)."),
    json_out: bool = JSON_OPT,
) -> None:
    """Make an Ed25519 signing key pair and a random 32-byte KEK; never overwrites."""
    from runtime_guard.bundle import generate_kek, generate_signing_keypair, write_secret_file

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / n for n in KEY_FILES]
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise InputError(f"refusing to overwrite existing key file(s): {', '.join(existing)}")
    priv, pub = generate_signing_keypair()
    write_secret_file(paths[0], priv)
    paths[1].write_bytes(pub)
    write_secret_file(paths[2], generate_kek().hex().encode() + b"\n")
    res = {"signing_key": str(paths[0]), "public_key": str(paths[1]), "kek": str(paths[2])}
    if json_out:
        print_json(res)
    else:
        table("keys", ["role", "file"], [("signing key (secret, publisher)", paths[0]),
                                         ("public key (pin on device)", paths[1]), ("KEK (secret, device)", paths[2])])


@handle_errors
def package(
    report: Path = typer.Argument(..., help="report.json from `edgeward audit` (its digest goes into the manifest)."),
    out_path: Path = typer.Option(..., "--out", help="Bundle file to write (.ewb)."),
    signing_key: Path = typer.Option(..., "--signing-key", help="Ed25519 private key (PEM, 0600)."),
    version: int = typer.Option(..., "--version", min=0, help="Monotonic bundle version (anti-rollback)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Variant from the report (default: the only one)."),
    key_file: Optional[Path] = KEY_FILE_OPT,
    kek_env: Optional[str] = KEK_ENV_OPT,
    passphrase_env: Optional[str] = PASS_ENV_OPT,
    model: Optional[Path] = typer.Option(None, "--model", help="Model file (default: the path in the report; sha256 must match)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data .npz for sanitizer range and golden inputs (default: the report's)."),
    expires_in: Optional[int] = typer.Option(None, "--expires-in", min=1, help="Seconds until the bundle expires."),
    output_policy: str = typer.Option("full", "--output-policy", help="|".join(OUTPUT_POLICIES) + "."),
    gate_action: str = typer.Option("flag", "--gate-action", help="OOD gate: off|flag|reject."),
    rate_limit: str = typer.Option("600/minute", "--rate-limit", help="Per-client rate ('none' to disable)."),
    runtime: Optional[Path] = typer.Option(None, "--runtime", help="JSON file with GuardConfig sections to override."),
    monitor_config: Optional[Path] = typer.Option(None, "--monitor-config", help="Calibrated extraction monitor "
                                                  "from `edgeward calibrate-monitor --out` (shipped in the bundle)."),
    calibrate_monitor: Optional[float] = typer.Option(None, "--calibrate-monitor", help="Calibrate the extraction "
                                                      "monitor here on --data and the shipped gate, for this honest "
                                                      "false-flag target (e.g. 0.01)."),
    monitor_space: Optional[str] = typer.Option(None, "--monitor-space", help="With --calibrate-monitor: PRADA "
                                                "distances on standardized (default), input or features."),
    force: bool = typer.Option(False, "--force", help="Package a variant that failed the policy (manifest records forced=true)."),
    model_signature: Optional[Path] = typer.Option(None, "--model-signature", help="OpenSSF model-signing signature of the model (key-based, offline); refused unless it verifies."),
    model_signing_key: Optional[Path] = typer.Option(None, "--model-signing-key", help="Model publisher's EC public key (PEM) for --model-signature."),
    json_out: bool = JSON_OPT,
) -> None:
    """Sign and encrypt a reviewed variant with its detectors, runtime policy and golden smoke set;
    also writes OUT.intoto.json, the in-toto attestation of the bundle and its audit verdict.

    Refuses (exit 1) a variant whose report failed the policy unless --force.
    """
    from hardening.cli.extraction import read_monitor_config
    from hardening.packaging import package_variant
    from runtime_guard.bundle import load_private_key
    from runtime_guard.errors import BundleError

    overrides = None
    if runtime is not None:
        try:
            overrides = json.loads(runtime.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{runtime}: not a readable JSON file ({e})") from None
        if not isinstance(overrides, dict):
            raise InputError(f"{runtime}: must hold a JSON object of GuardConfig sections")
    kek = _kek(key_file, kek_env, passphrase_env)
    try:
        sk = load_private_key(signing_key)
    except BundleError as e:
        raise _key_error(e) from None
    res = package_variant(
        report, out_path, signing_key=sk, kek=kek, version=version, variant=variant, model_path=model,
        data_path=data, expires_in_s=expires_in, force=force, output_policy=output_policy, gate_action=gate_action,
        rate_limit=None if rate_limit.lower() == "none" else rate_limit, runtime_overrides=overrides,
        model_signature=model_signature, model_signing_key=model_signing_key,
        monitor_config=read_monitor_config(monitor_config), calibrate_monitor=calibrate_monitor,
        monitor_space=monitor_space,
    )
    if json_out:
        print_json({k: v for k, v in res.to_dict().items() if k != "manifest"} | {"version": version})
    else:
        note = f" [red]FORCED past {len(res.failed_checks)} failed check(s)[/red]" if res.forced else ""
        out.print(f"wrote {res.out_path}: variant {res.variant}, version {version}, report sha256 "
                  f"{res.report_digest[:16]}...{note}", highlight=False)


@handle_errors
def verify(
    bundle: Path = typer.Argument(..., help="Bundle file."),
    public_key: Path = typer.Option(..., "--public-key", help="Pinned Ed25519 public key (PEM)."),
    key_file: Optional[Path] = KEY_FILE_OPT,
    kek_env: Optional[str] = KEK_ENV_OPT,
    passphrase_env: Optional[str] = PASS_ENV_OPT,
    rollback_state: Optional[Path] = typer.Option(None, "--rollback-state", help="Anti-rollback state (read, never updated)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also check the manifest's report_digest against this report.json."),
    json_out: bool = JSON_OPT,
) -> None:
    """Full device-side verification (signature, freshness, rollback, decryption, model admission).

    Exit 0 if the bundle is safe to load, 1 if a check failed, 2 on bad keys/options.
    """
    import hashlib

    from runtime_guard.bundle import verify_bundle
    from runtime_guard.errors import BundleError, BundleKeyError, ModelRejected

    kek = _kek(key_file, kek_env, passphrase_env)
    try:
        res = verify_bundle(bundle, public_key, kek, rollback_state=rollback_state)
    except BundleKeyError as e:
        if e.check in ("key-file", "key-permissions", "kek-format", "kek-source", "public-key"):
            raise _key_error(e) from None
        raise CheckFailed(f"{bundle}: {e.check}: {e}") from None
    except (BundleError, ModelRejected) as e:
        raise CheckFailed(f"{bundle}: {getattr(e, 'check', 'bundle')}: {e}") from None
    except FileNotFoundError as e:
        raise InputError(f"{bundle}: {e.strerror}") from None
    m = res["manifest"]
    if report is not None:
        got = hashlib.sha256(report.read_bytes()).hexdigest()
        if got != m.get("report_digest"):
            raise CheckFailed(f"{bundle}: report_digest {str(m.get('report_digest'))[:16]}... does not match {report}")
    summary = {"ok": True, "version": res["version"], "manifest_sha256": res["manifest_sha256"],
               "model": m.get("model"), "report_digest": m.get("report_digest"), "forced": m.get("forced"),
               "payloads": res["payloads"], "expires_at": m.get("expires_at")}
    if json_out:
        print_json(summary)
    else:
        table(f"verified {bundle}", ["field", "value"], [
            ("version", res["version"]), ("model", (m.get("model") or {}).get("name")),
            ("report_digest", m.get("report_digest")), ("forced", "yes" if m.get("forced") else "no"),
            ("payloads", ", ".join(f"{k} ({v} B)" for k, v in res["payloads"].items())),
            ("expires_at", m.get("expires_at")),
        ])


@handle_errors
def inspect(
    bundle: Path = typer.Argument(..., help="Bundle file."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="Also check the signature (no secret needed)."),
    json_out: bool = JSON_OPT,
) -> None:
    """Header and manifest without any secret key (signature checked if --public-key is given)."""
    from runtime_guard.bundle import inspect_bundle
    from runtime_guard.errors import BundleError

    try:
        info = inspect_bundle(bundle, public_key)
    except BundleError as e:
        raise CheckFailed(f"{bundle}: {e.check}: {e}") from None
    except FileNotFoundError as e:
        raise InputError(f"{bundle}: {e.strerror}") from None
    if json_out:
        print_json(info)
    else:
        m = info["manifest"]
        table(f"bundle {bundle}", ["field", "value"], [
            ("signature", {True: "verified", False: "DOES NOT VERIFY", None: "not checked"}[info["signature_verified"]]),
            ("version", m.get("version")), ("model", (m.get("model") or {}).get("name")),
            ("report_digest", m.get("report_digest")), ("forced", "yes" if m.get("forced") else "no"),
            ("runtime", ", ".join(f"{k}" for k in (m.get("runtime") or {}))),
            ("payloads", ", ".join(f"{p['name']} ({p['size']} B)" for p in m["payloads"])),
            ("kek", info["kek"]["kind"]), ("size", f"{info['file_size']} B (expected {info['expected_size']})"),
        ])
    if info["signature_verified"] is False:
        raise typer.Exit(1)
