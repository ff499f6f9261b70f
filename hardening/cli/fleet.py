"""``edgeward publish`` / ``edgeward repo ...`` (TUF repository, release side) and
``edgeward update`` (one device-side update check). See docs/updates.md."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from hardening.cli.common import JSON_OPT, handle_errors, out, print_json, table
from hardening.errors import CheckFailed, InputError

PASS_ENV = "EDGEWARD_REPO_PASSPHRASE"
REPO_OPT = typer.Option(..., "--repo", help="Repository directory (served as plain files).")
KEYS_OPT = typer.Option(..., "--keys", help="Directory of the encrypted role keys (never served).")
PASS_OPT = typer.Option(PASS_ENV, "--keys-passphrase-env", help="Environment variable holding the role-key passphrase.")


def register(app: typer.Typer, audit: typer.Typer) -> None:
    app.command("publish")(publish)
    app.command("update")(update)
    app.command("device-key")(device_key)
    app.command("recipients")(recipients)
    repo_app = typer.Typer(help="TUF repository for fleet updates: init, rotate keys, staged rollout.",
                           no_args_is_help=True)
    repo_app.command("init")(init)
    repo_app.command("rotate-key")(rotate_key)
    repo_app.command("set-percentage")(set_percentage)
    repo_app.command("refresh-timestamp")(refresh_timestamp)
    repo_app.command("releases")(releases)
    app.add_typer(repo_app, name="repo")


def _repository(repo: Path, keys: Path, passphrase_env: str) -> Any:
    import importlib.util

    if importlib.util.find_spec("tuf") is None:
        raise InputError("this command needs the 'fleet' extra (python-tuf): pip install 'edgeward[fleet]'")
    from hardening.fleet import Repository

    pw = os.environ.get(passphrase_env)
    if not pw:
        raise InputError(f"environment variable {passphrase_env} (role-key passphrase) is not set")
    return Repository(repo, keys, pw.encode())


def _thresholds(values: list[str]) -> dict[str, int]:
    outd: dict[str, int] = {}
    for v in values:
        role, _, n = v.partition("=")
        if not n.isdigit():
            raise InputError(f"--threshold {v!r}: expected ROLE=N, e.g. targets=2")
        outd[role] = int(n)
    return outd


@handle_errors
def init(
    repo: Path = REPO_OPT,
    keys: Path = KEYS_OPT,
    threshold: list[str] = typer.Option([], "--threshold", help="ROLE=N signatures required (as many keys are made); repeatable."),
    passphrase_env: str = PASS_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Create root/targets/snapshot/timestamp metadata and encrypted role keys."""
    r = _repository(repo, keys, passphrase_env)
    r = type(r).init(repo, keys, r._passphrase, thresholds=_thresholds(threshold))
    root = r.load("root").signed
    res = {"repo": str(repo), "root": str(repo / "metadata" / "1.root.json"),
           "roles": {k: {"threshold": v.threshold, "keyids": v.keyids} for k, v in root.roles.items()}}
    if json_out:
        print_json(res)
    else:
        table("repository", ["role", "threshold", "keys"],
              [(k, v["threshold"], len(v["keyids"])) for k, v in res["roles"].items()])
        out.print(f"provision devices with {res['root']} (--trusted-root)", highlight=False)


@handle_errors
def publish(
    bundle: Path = typer.Argument(..., help="Signed bundle (.ewb) from `edgeward package`."),
    repo: Path = REPO_OPT,
    keys: Path = KEYS_OPT,
    percentage: int = typer.Option(100, "--percentage", min=0, max=100, help="Share of the fleet (stable cohorts) that gets it."),
    channel: str = typer.Option("stable", "--channel", help="Release channel."),
    attestation: Optional[Path] = typer.Option(None, "--attestation", help="in-toto attestation (default: BUNDLE.intoto.json if present)."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="Release public key: check bundle signature and attestation first."),
    rotate_targets_key: bool = typer.Option(False, "--rotate-targets-key", help="Rotate the targets keys first (e.g. after a compromise)."),
    passphrase_env: str = PASS_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Add a bundle as a TUF target (version, report digest, attestation, rollout in its custom metadata)."""
    r = _repository(repo, keys, passphrase_env)
    rotated = r.rotate("targets") if rotate_targets_key else None
    rel = r.publish(bundle, percentage=percentage, channel=channel, attestation=attestation,
                    public_key=str(public_key) if public_key else None)
    res = rel.to_dict() | {"channel": channel, "rotated_targets_keys": rotated}
    if json_out:
        print_json(res)
    else:
        out.print(f"published {rel.target} (version {rel.version}) to {percentage:g}% of '{channel}'"
                  f"{'' if rel.attestation else ' [yellow]without attestation[/yellow]'}", highlight=False)


@handle_errors
def rotate_key(role: str = typer.Argument(..., help="root|targets|snapshot|timestamp"),
               repo: Path = REPO_OPT, keys: Path = KEYS_OPT, passphrase_env: str = PASS_OPT,
               json_out: bool = JSON_OPT) -> None:
    """Replace every key of ROLE; old keys are revoked in a new root version."""
    new = _repository(repo, keys, passphrase_env).rotate(role)
    print_json({"role": role, "keyids": new}) if json_out else out.print(f"{role}: new keys {', '.join(k[:12] for k in new)}")


@handle_errors
def set_percentage(target: str = typer.Argument(..., help="Release target, e.g. bundles/v2/model.ewb."),
                   percentage: int = typer.Argument(..., min=0, max=100),
                   repo: Path = REPO_OPT, keys: Path = KEYS_OPT, passphrase_env: str = PASS_OPT) -> None:
    """Widen or pull back a staged release (re-signs targets, snapshot, timestamp)."""
    _repository(repo, keys, passphrase_env).set_percentage(target, percentage)


@handle_errors
def refresh_timestamp(repo: Path = REPO_OPT, keys: Path = KEYS_OPT, passphrase_env: str = PASS_OPT,
                      expires_in: Optional[float] = typer.Option(None, "--expires-in", help="Seconds (default one day).")) -> None:
    """Re-sign the timestamp (run it well inside the timestamp expiry, e.g. from cron)."""
    _repository(repo, keys, passphrase_env).refresh_timestamp(expires_in)


@handle_errors
def releases(repo: Path = REPO_OPT, keys: Path = KEYS_OPT, channel: str = typer.Option("stable", "--channel"),
             passphrase_env: str = PASS_OPT, json_out: bool = JSON_OPT) -> None:
    """The channel's releases, newest first, with their signed rollout settings."""
    r = _repository(repo, keys, passphrase_env)
    targets = r.load("targets").signed.targets
    rows = [{"target": rel["target"], **(targets[rel["target"]].custom or {}).get("edgeward", {})}
            for rel in r.releases(channel)]
    if json_out:
        print_json(rows)
    else:
        table(f"channel {channel}", ["target", "version", "percentage", "attested"],
              [(x["target"], x.get("version"), (x.get("rollout") or {}).get("percentage"),
                "yes" if x.get("attestation") else "no") for x in rows])


@handle_errors
def device_key(out_dir: Path = typer.Option(..., "--out", help="Folder for device.key (0600) and device.pub.pem."),
               json_out: bool = JSON_OPT) -> None:
    """Make this device's X25519 key pair for per-device key wrapping; never overwrites."""
    from runtime_guard.bundle import write_secret_file
    from runtime_guard.bundle.recipients import generate_device_key

    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / "device.key", out_dir / "device.pub.pem"
    if priv_path.exists() or pub_path.exists():
        raise InputError(f"refusing to overwrite {priv_path} / {pub_path}")
    priv, pub = generate_device_key()
    write_secret_file(priv_path, priv)
    pub_path.write_bytes(pub)
    res = {"device_key": str(priv_path), "public_key": str(pub_path)}
    print_json(res) if json_out else out.print(f"device key {priv_path} (secret), public key {pub_path}", highlight=False)


@handle_errors
def recipients(
    bundle: Path = typer.Argument(..., help="Bundle packaged with a raw KEK file (use a fresh KEK per release)."),
    key_file: Path = typer.Option(..., "--key-file", help="The bundle's raw KEK file."),
    device: list[str] = typer.Option(..., "--device", help="ID=device.pub.pem; repeatable (revoked devices: leave out)."),
    public_key: Path = typer.Option(..., "--public-key", help="Release public key (the bundle's signature is checked)."),
    json_out: bool = JSON_OPT,
) -> None:
    """Write BUNDLE.recipients.json: the bundle's KEK sealed to each listed device (X25519)."""
    from runtime_guard.bundle import inspect_bundle, load_kek
    from runtime_guard.bundle.recipients import load_device_public_key, seal
    from runtime_guard.errors import BundleError

    try:
        kek = load_kek(file=key_file)
        info = inspect_bundle(bundle, str(public_key))
        devices = {}
        for d in device:
            dev_id, _, path = d.partition("=")
            if not dev_id or not path:
                raise InputError(f"--device {d!r}: expected ID=device.pub.pem")
            devices[dev_id] = load_device_public_key(Path(path).read_bytes())
    except BundleError as e:
        raise InputError(f"{e.check}: {e}") from None
    except OSError as e:
        raise InputError(f"{e.filename}: {e.strerror}") from None
    if info["signature_verified"] is not True:
        raise CheckFailed(f"{bundle}: signature does not verify with {public_key}")
    outp = bundle.with_name(bundle.name + ".recipients.json")
    outp.write_bytes(seal(kek.secret, devices, info["manifest_sha256"]))
    res = {"recipients_file": str(outp), "devices": sorted(devices)}
    print_json(res) if json_out else out.print(f"wrote {outp} for {len(devices)} device(s)", highlight=False)


@handle_errors
def update(
    source: str = typer.Option(..., "--from", help="Repository URL (http://...)."),
    state_dir: Path = typer.Option(..., "--state-dir", help="Device state: TUF metadata, slots, anti-rollback state."),
    device_id: str = typer.Option(..., "--device-id", help="Stable id of this device (cohort selection)."),
    public_key: Path = typer.Option(..., "--public-key", help="Pinned Ed25519 release key (PEM)."),
    trusted_root: Optional[Path] = typer.Option(None, "--trusted-root", help="Repository root.json (first run)."),
    key_file: Optional[Path] = typer.Option(None, "--key-file", help="KEK file, to verify the bundle fully."),
    kek_env: Optional[str] = typer.Option(None, "--kek-env"),
    passphrase_env: Optional[str] = typer.Option(None, "--passphrase-env"),
    channel: str = typer.Option("stable", "--channel"),
    allow_unattested: bool = typer.Option(False, "--allow-unattested", help="Accept releases without an attestation."),
    json_out: bool = JSON_OPT,
) -> None:
    """One update check: TUF refresh, cohort, download, attestation, full bundle verification.

    Exit 0 with the release this device should run (its local path), 1 if anything was
    refused, 2 on bad options. Nothing is swapped: `serve --update-from` does that."""
    from hardening.cli.bundle import _kek
    from runtime_guard.bundle import RollbackState, load_public_key, verify_bundle
    from runtime_guard.errors import BundleError, ModelRejected
    from runtime_guard.update.client import FleetUpdater

    try:
        pk = load_public_key(public_key)
        updater = FleetUpdater(source, state_dir, pk, device_id, channel=channel, trusted_root=trusted_root,
                               require_attestation=not allow_unattested)
    except BundleError as e:
        raise InputError(f"{e.check}: {e}") from None
    kek = _kek(key_file, kek_env, passphrase_env) if any((key_file, kek_env, passphrase_env)) else None
    try:
        offer = updater.check()
        if offer is not None and kek is not None:
            verify_bundle(offer.path, pk, kek, rollback_state=RollbackState(state_dir / "rollback.json"))
    except (BundleError, ModelRejected) as e:
        raise CheckFailed(f"update refused: {getattr(e, 'check', 'bundle')}: {e}") from None
    res = {"release": None if offer is None else offer.to_dict() | {"path": offer.path,
                                                                     "bundle_verified": kek is not None}}
    if json_out:
        print_json(res)
    elif offer is None:
        out.print("no release for this device's cohort", highlight=False)
    else:
        out.print(f"release {offer.target} (version {offer.version}) verified: {offer.path}", highlight=False)
