"""Fleet updates, in process: TUF repository (hardening.fleet) over HTTP on 127.0.0.1,
ngclient updater (runtime_guard.update.client), cohorts, attestations, probation rules."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest
from fleet_fixtures import PASSPHRASE, StaticServer, attested_bundle, new_repo, serve_copy, snapshot_repo

from runtime_guard.bundle import load_public_key
from runtime_guard.update import attestation
from runtime_guard.update.cohort import bucket, in_cohort
from runtime_guard.update.errors import UpdateError
from runtime_guard.update.triggers import Figures, ProbationRules, judge

from api_fixtures import api_env  # noqa: F401


def test_cohorts_are_stable_nested_and_near_the_percentage():
    ids = [f"device-{i}" for i in range(4000)]
    assert [bucket(d, "stable") for d in ids[:50]] == [bucket(d, "stable") for d in ids[:50]]
    for pct in (10, 25, 50):
        share = sum(in_cohort(d, "stable", pct) for d in ids) / len(ids)
        assert abs(share - pct / 100) < 0.03, (pct, share)
    # nested: raising the percentage only adds devices
    assert all(in_cohort(d, "stable", 50) for d in ids if in_cohort(d, "stable", 25))
    assert not any(in_cohort(d, "stable", 0) for d in ids) and all(in_cohort(d, "stable", 100) for d in ids)
    with pytest.raises(ValueError):
        in_cohort("", "stable", 10)


def test_attestation_round_trip_tamper_and_policy(api_env, tmp_path):
    b = attested_bundle(api_env, tmp_path / "m.ewb", 1)
    env = (tmp_path / "m.ewb.intoto.json").read_bytes()
    pk = load_public_key(api_env.public_key_path)
    import hashlib

    digest = hashlib.sha256(b.read_bytes()).hexdigest()
    stmt = attestation.check(env, pk, digest, "ab" * 32)
    assert stmt["subject"][0]["digest"]["sha256"] == digest
    # interoperable: securesystemslib's DSSE Envelope reads and verifies the same bytes
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    key = SSlibKey.from_crypto(pk, keyid=json.loads(env)["signatures"][0]["keyid"])
    envelope = Envelope.from_dict(json.loads(env))
    assert key.keyid in envelope.verify([key], 1)
    # tampered payload (verdict flipped to a pass it never had) -> signature check fails
    bad = attested_bundle(api_env, tmp_path / "bad.ewb", 1, passed=False)
    bad_env = json.loads((tmp_path / "bad.ewb.intoto.json").read_bytes())
    bad_digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    with pytest.raises(UpdateError) as e:
        attestation.check(json.dumps(bad_env).encode(), pk, bad_digest, "ab" * 32)
    assert e.value.check == "attestation-verdict"
    payload = json.loads(base64.b64decode(bad_env["payload"]))
    payload["predicate"]["verdict"] = {"passed": True, "forced": False, "failed_checks": []}
    bad_env["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(UpdateError) as e:
        attestation.check(json.dumps(bad_env).encode(), pk, bad_digest, "ab" * 32)
    assert e.value.check == "attestation-signature"
    with pytest.raises(UpdateError) as e:  # about another file
        attestation.check(env, pk, bad_digest, "ab" * 32)
    assert e.value.check == "attestation-subject"
    with pytest.raises(UpdateError) as e:  # another audit report than the manifest's
        attestation.check(env, pk, digest, "cd" * 32)
    assert e.value.check == "attestation-report"
    with pytest.raises(UpdateError) as e:
        attestation.check(b"{not json", pk, digest, "ab" * 32)
    assert e.value.check == "attestation-format"


def test_probation_rules_fire_on_each_signal_and_not_on_a_healthy_bundle():
    rules = ProbationRules(min_requests=20)
    ref = Figures(200, 0.02, 0.001, 0.05)
    ok = judge(Figures(40, 0.05, 0.0012, 0.1), ref, rules)
    assert ok.trigger is None and ok.evidence["checks"]["rejection_rate"]["status"] == "ok"
    assert judge(Figures(40, 0.6, 0.001, 0.1), ref, rules).trigger == "rejection_rate"
    assert judge(Figures(40, 0.02, 0.02, 0.1), ref, rules).trigger == "latency"
    assert judge(Figures(40, 0.02, 0.001, 1.3), ref, rules).trigger == "drift_psi"
    waiting = judge(Figures(5, 1.0, 1.0, None), ref, rules)
    assert waiting.trigger is None and waiting.evidence["checks"]["rejection_rate"]["status"] == "waiting"
    # a noised snapshot has no latency sum: reported, never guessed
    assert judge(Figures(40, 0.02, None, 0.1), ref, rules).evidence["checks"]["latency"]["status"] == "unavailable"


def test_repository_keys_are_encrypted_and_outside_the_served_tree(tmp_path):
    repo = new_repo(tmp_path, targets=2)
    keys = list((tmp_path / "keys").glob("*.pem"))
    assert len(keys) == 5  # root, 2 x targets, snapshot, timestamp
    for k in keys:
        assert stat.S_IMODE(os.stat(k).st_mode) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in k.read_bytes()
    assert not list((tmp_path / "repo").rglob("*.pem"))
    assert repo.load("root").signed.roles["targets"].threshold == 2
    from hardening.errors import InputError
    from hardening.fleet import Repository

    with pytest.raises(InputError, match="passphrase"):
        Repository(tmp_path / "repo", tmp_path / "keys", b"wrong").signers("targets")
    with pytest.raises(InputError, match="outside"):
        Repository(tmp_path / "repo", tmp_path / "repo" / "keys", PASSPHRASE.encode())


def _updater(api_env, url, state, device="dev-1", root=None):
    from runtime_guard.update.client import FleetUpdater

    return FleetUpdater(url, state, load_public_key(api_env.public_key_path), device, trusted_root=root)


def test_updater_installs_only_in_cohort_and_refuses_tuf_attacks(api_env, tmp_path):
    """Every attack on a device that trusts repository state N: refused with a named check."""
    from tuf.api.metadata import Metadata

    repo = new_repo(tmp_path, targets=2)
    served = tmp_path / "served"
    served.mkdir()
    root = tmp_path / "repo" / "metadata" / "1.root.json"
    b1 = attested_bundle(api_env, tmp_path / "digits-v1.ewb", 1)
    repo.publish(b1, public_key=str(api_env.public_key_path))
    good1 = snapshot_repo(tmp_path / "repo", tmp_path / "good1")
    with StaticServer(served, tmp_path / "http.log") as http:
        serve_copy(good1, served)
        up = _updater(api_env, http.url, tmp_path / "dev", root=root)
        offer = up.check()
        assert offer is not None and offer.version == 1 and offer.statement is not None

        b2 = attested_bundle(api_env, tmp_path / "digits-v2.ewb", 2)
        rel2 = repo.publish(b2, percentage=100)
        good2 = snapshot_repo(tmp_path / "repo", tmp_path / "good2")

        def attempt(check):
            with pytest.raises(UpdateError) as e:
                up.check()
            assert e.value.check == check, (check, e.value.check, str(e.value))

        # 1. target with a wrong hash (bytes swapped on the mirror)
        serve_copy(good2, served)
        (f,) = (served / "targets" / "bundles" / "v2").glob("*.digits-v2.ewb")
        f.write_bytes(b1.read_bytes()[: f.stat().st_size].ljust(f.stat().st_size, b"\0"))
        attempt("tuf-hash")
        # 2. mix-and-match: good1's timestamp + snapshot, good2's targets content under v1's name
        serve_copy(good1, served)
        (served / "metadata" / "1.targets.json").write_bytes((good2 / "metadata" / "2.targets.json").read_bytes())
        attempt("tuf-version")
        # 3. now legitimately on good2; then a metadata rollback to good1
        serve_copy(good2, served)
        assert up.check().version == 2
        serve_copy(good1, served)
        attempt("tuf-version")
        # 4. freeze: a newer, correctly signed timestamp that has expired (replayed late)
        repo.refresh_timestamp(expires_in_s=-60)
        serve_copy(tmp_path / "repo", served)
        attempt("tuf-expired")
        repo.refresh_timestamp()
        # 5. targets signed below threshold (attacker holds one of the two targets keys
        #    plus the online snapshot/timestamp keys)
        keyids = repo.load("root").signed.roles["targets"].keyids
        attacker = _attacker_copy(tmp_path)
        targets = attacker.load("targets")
        targets.signed.targets[rel2.target].unrecognized_fields["custom"]["edgeward"]["version"] = 99
        _sign_as_attacker(attacker, targets, [repo.load_signer(keyids[0])])
        serve_copy(tmp_path / "attacker", served)
        attempt("tuf-signature")
        # 6. compromised-then-rotated targets keys: device learns root v2, old keys refused
        repo.rotate("targets")
        serve_copy(tmp_path / "repo", served)
        assert up.check().version == 2
        old = [repo.load_signer(k, revoked=True) for k in keyids]
        attacker = _attacker_copy(tmp_path)
        targets = attacker.load("targets")
        targets.signed.targets[rel2.target].unrecognized_fields["custom"]["edgeward"]["version"] = 98
        _sign_as_attacker(attacker, targets, old)
        serve_copy(tmp_path / "attacker", served)
        attempt("tuf-signature")
        assert Metadata.from_file(str(tmp_path / "dev" / "tuf" / "metadata" / "root.json")).signed.version == 2


def _attacker_copy(tmp_path):
    """The attacker's working copy of the repository (the publisher's stays untouched)."""
    from hardening.fleet import Repository

    snapshot_repo(tmp_path / "repo", tmp_path / "attacker")
    return Repository(tmp_path / "attacker", tmp_path / "keys", PASSPHRASE.encode())


def _sign_as_attacker(repo, targets, signers):
    """New targets version signed by ``signers`` only, with a valid snapshot + timestamp over it."""
    from tuf.api.metadata import MetaFile

    root = repo.load("root")
    snap, ts = repo.load("snapshot"), repo.load("timestamp")
    targets.signed.version += 1
    targets.signatures.clear()
    for s in signers:
        targets.sign(s, append=True)
    snap.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
    snap.signed.version += 1
    repo._sign(snap, "snapshot", root)
    ts.signed.snapshot_meta = MetaFile(version=snap.signed.version)
    ts.signed.version += 1
    repo._sign(ts, "timestamp", root)
    for md, name in ((targets, "targets"), (snap, "snapshot"), (ts, "timestamp")):
        repo._write(md, name)


def test_rejection_spike_rolls_back_with_evidence_in_status_and_metrics(api_env, tmp_path):
    """A bundle whose signed sanitizer range is too narrow for real traffic: every answer is
    a 400 (no server error, so the error-rate rule never fires); the telemetry rule does."""
    import numpy as np
    import onnxruntime as ort

    from api import create_app
    from api.reload import RollbackTrigger

    from api_fixtures import ADMIN_TOKEN, json_body

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    v1 = api_env.make_bundle(tmp_path / "v1.ewb", 1)
    small = (api_env.x[:8] * 0.5).astype(np.float32)  # the golden set fits the narrow range
    sess = ort.InferenceSession(api_env.model_bytes, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: small})[0]
    runtime = api_env.runtime()
    runtime["input"]["value_range"] = [0.0, 0.5]
    golden = {"inputs": small.tolist(), "expected_labels": logits.argmax(1).tolist(),
              "expected_logits": logits.tolist(), "atol": 1e-4}
    v2 = api_env.make_bundle(tmp_path / "v2.ewb", 2, runtime=runtime, golden=golden)
    app = create_app(api_env.app_config(v1, admin_token=ADMIN_TOKEN,
                                        rollback_trigger=RollbackTrigger(min_requests=10, window_s=60),
                                        probation_rules=ProbationRules(min_requests=10)))
    c = app.test_client()
    for i in range(20):  # reference traffic on v1
        assert c.post("/v1/predict", data=json_body(api_env.x[i:i + 1]), content_type="application/json").status_code == 200
    assert c.post("/v1/admin/reload", json={"path": str(v2)}, headers=admin).get_json()["outcome"] == "swapped"
    x = api_env.x[np.asarray(api_env.x).reshape(len(api_env.x), -1).max(1) > 0.5][:10]
    codes = [c.post("/v1/predict", data=json_body(x[i:i + 1]), content_type="application/json").status_code
             for i in range(10)]
    assert codes == [400] * 10
    status = c.get("/v1/admin/status", headers=admin).get_json()
    ev = status["last_event"]
    assert ev["outcome"] == "rolled-back" and ev["trigger"] == "rejection_rate", ev
    assert ev["evidence"]["checks"]["rejection_rate"]["live"] == 1.0
    assert ev["evidence"]["checks"]["rejection_rate"]["reference"] == 0.0
    assert status["current"]["version"] == 1
    assert 'edgeward_rollbacks_total{trigger="rejection_rate"} 1.0' in c.get("/metrics").get_data(as_text=True)


def test_state_dir_turns_bundle_anti_rollback_on_by_default(api_env, tmp_path):
    from api import create_app
    from runtime_guard.errors import RollbackError

    v1 = api_env.make_bundle(tmp_path / "v1.ewb", 1)
    v2 = api_env.make_bundle(tmp_path / "v2.ewb", 2)
    create_app(api_env.app_config(v2, state_dir=str(tmp_path / "state")))  # serves v2: committed
    assert json.loads((tmp_path / "state" / "rollback.json").read_text())["version"] == 2
    with pytest.raises(RollbackError):  # a restart with the older signed bundle is refused
        create_app(api_env.app_config(v1, state_dir=str(tmp_path / "state")))
    create_app(api_env.app_config(v1))  # without a state directory there is nothing to compare with


def test_per_device_key_wrapping_through_the_repository(api_env, tmp_path):
    """One signed bundle, its KEK sealed to two devices; a revoked third device cannot open
    it, and neither can a recipient entry moved to another bundle."""
    import hashlib

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from api import create_app
    from runtime_guard.bundle import generate_kek, write_bundle, write_secret_file
    from runtime_guard.bundle.recipients import generate_device_key, load_device_public_key, seal
    from runtime_guard.errors import BundleKeyError
    from runtime_guard.update.client import FleetUpdater

    keys = {}
    for d in ("dev-a", "dev-b", "dev-revoked"):
        priv, pub = generate_device_key()
        write_secret_file(tmp_path / f"{d}.key", priv)
        keys[d] = load_device_public_key(pub)
    kek = generate_kek()  # fresh per release
    b = tmp_path / "digits-v1.ewb"
    manifest = write_bundle(b, {"model": api_env.model_bytes},
                            {"model": {"name": "digits"}, "runtime": api_env.runtime(), "smoke_test": api_env.golden(),
                             "report_digest": "ab" * 32}, api_env.signing_key, kek, 1)
    from runtime_guard.bundle.manifest import canonical_json

    digest = hashlib.sha256(canonical_json(manifest)).hexdigest()
    (tmp_path / "digits-v1.ewb.recipients.json").write_bytes(seal(kek, {d: keys[d] for d in ("dev-a", "dev-b")}, digest))
    sk = load_pem_private_key(api_env.signing_key, None)
    stmt = attestation.statement(b.name, hashlib.sha256(b.read_bytes()).hexdigest(), "ab" * 32,
                                 {"passed": True, "forced": False, "failed_checks": []})
    (tmp_path / "digits-v1.ewb.intoto.json").write_bytes(attestation.sign(stmt, sk))
    repo = new_repo(tmp_path)
    repo.publish(b)
    with StaticServer(tmp_path / "repo", tmp_path / "http.log") as http:
        for d in ("dev-a", "dev-b", "dev-revoked"):
            offer = FleetUpdater(http.url, tmp_path / f"state-{d}", load_public_key(api_env.public_key_path), d,
                                 trusted_root=tmp_path / "repo" / "metadata" / "1.root.json").check()
            cfg = dict(bundle=offer.path, public_key=str(api_env.public_key_path), device_id=d,
                       device_key_file=str(tmp_path / f"{d}.key"))
            if d == "dev-revoked":
                with pytest.raises(BundleKeyError) as e:
                    create_app(cfg)
                assert e.value.check == "not-a-recipient"
            else:
                from api_fixtures import json_body

                c = create_app(cfg).test_client()
                r = c.post("/v1/predict", data=json_body(api_env.x[:1]), content_type="application/json")
                assert r.status_code == 200, r.get_data(as_text=True)
    other = api_env.make_bundle(tmp_path / "other.ewb", 2)  # dev-a's entry moved to another bundle
    (tmp_path / "other.ewb.recipients.json").write_bytes((tmp_path / "digits-v1.ewb.recipients.json").read_bytes())
    with pytest.raises(BundleKeyError) as e:
        create_app(dict(bundle=str(other), public_key=str(api_env.public_key_path), device_id="dev-a",
                        device_key_file=str(tmp_path / "dev-a.key")))
    assert e.value.check == "recipient-unwrap"
