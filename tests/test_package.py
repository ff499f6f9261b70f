"""``edgeward keygen / package / verify / inspect``: provenance in the signed manifest.

A small real audit (float variant, OOD area) provides report.json and the detectors.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from hardening.cli import app
from hardening.report import Policy, load_report, rejudge, run_full_audit

runner = CliRunner()


@pytest.fixture(scope="module")
def reviewed(digits_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("review")
    res = run_full_audit(digits_demo.model_path, digits_demo.data_path, out, kinds=("float",), areas=("ood",),
                         sizes={"ood_synthetic": 100}, allow_skipped=True)
    assert res.passed, res.report["verdict"]
    failing = out / "failing.json"  # same measurements, a policy the model cannot meet
    p = Policy()
    p.ood.min_auroc = 0.9999
    failing.write_text(json.dumps(rejudge(load_report(res.report_path), p)))
    keys = tmp_path_factory.mktemp("keys")
    r = runner.invoke(app, ["keygen", "--out", str(keys)])
    assert r.exit_code == 0, r.output
    return res.report_path, failing, keys


def _package(report, keys, out, *extra):
    return runner.invoke(app, ["package", str(report), "--out", str(out), "--signing-key", str(keys / "signing.pem"),
                               "--key-file", str(keys / "kek.key"), "--version", "3", *extra])


def test_keygen_writes_private_files_0600_and_never_overwrites(reviewed):
    _, _, keys = reviewed
    assert (keys / "signing.pem").stat().st_mode & 0o777 == 0o600
    assert (keys / "kek.key").stat().st_mode & 0o777 == 0o600
    r = runner.invoke(app, ["keygen", "--out", str(keys)])
    assert r.exit_code == 2 and "refusing to overwrite" in r.output


def test_package_records_report_digest_and_verifies(reviewed, tmp_path):
    report, _, keys = reviewed
    bundle = tmp_path / "m.ewb"
    r = _package(report, keys, bundle, "--variant", "float", "--gate-action", "reject")
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", str(bundle), "--public-key", str(keys / "signing.pub.pem"),
                            "--key-file", str(keys / "kek.key"), "--report", str(report), "--json"])
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)
    assert v["report_digest"] == hashlib.sha256(report.read_bytes()).hexdigest()
    assert v["forced"] is False and v["version"] == 3
    assert set(v["payloads"]) == {"model", "detectors.npz", "smoke.npz"}
    r = runner.invoke(app, ["inspect", str(bundle), "--public-key", str(keys / "signing.pub.pem"), "--json"])
    assert r.exit_code == 0
    m = json.loads(r.stdout)["manifest"]
    assert m["runtime"]["anomaly"]["action"] == "reject" and m["runtime"]["input"]["value_range"] == [0.0, 1.0]
    assert m["runtime"]["input"]["sample_shape"] == [1, 8, 8]
    assert m["review"]["passed"] is True
    tel = m["runtime"]["telemetry"]  # both drift references are signed into the bundle
    assert len(tel["reference_class_counts"]) == 6
    assert len(tel["reference_ood_counts"]) == len(tel["ood_edges"]) + 1 >= 2


def test_packaged_bundle_loads_in_the_runtime_and_passes_its_golden_smoke_test(reviewed, tmp_path):
    from api.reload import Deployment
    from api.service import smoke_test
    from runtime_guard.bundle import load_kek
    from runtime_guard.guard import GuardedModel

    report, _, keys = reviewed
    bundle = tmp_path / "m.ewb"
    assert _package(report, keys, bundle).exit_code == 0
    g = GuardedModel.load(bundle, keys / "signing.pub.pem", load_kek(file=keys / "kek.key"), accept=False)
    assert g.manifest["smoke_test"] == {"payload": "smoke.npz", "atol": 1e-4, "n": 4}  # signed, not inline
    golden = g.golden
    assert golden is not None and golden.inputs.shape == (4, 1, 8, 8)
    smoke_test(Deployment(model=g, version=3, name="m", manifest_sha256="", source=str(bundle), manifest=g.manifest))
    res = g.predict(golden.inputs, "client-1")
    assert list(res.labels) == golden.expected_labels.tolist()
    drift = g.snapshot()["drift"]  # the ood_score family exists; no PSI from 4 samples
    assert drift["ood_score"] == {"psi": None, "alert": False, "n": 4, "min_samples": 100}
    assert drift["predicted_class"]["psi"] is None and drift["predicted_class"]["n"] == 4


def test_refuses_failed_variant_unless_forced(reviewed, tmp_path):
    _, failing, keys = reviewed
    r = _package(failing, keys, tmp_path / "x.ewb")
    assert r.exit_code == 1
    assert "failed" in r.output and "--force" in r.output
    assert not (tmp_path / "x.ewb").exists()
    r = _package(failing, keys, tmp_path / "x.ewb", "--force", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["forced"] is True
    r = runner.invoke(app, ["inspect", str(tmp_path / "x.ewb"), "--json"])
    m = json.loads(r.stdout)["manifest"]
    assert m["forced"] is True and m["review"]["failed_checks"]
    assert m["report_digest"] == hashlib.sha256(failing.read_bytes()).hexdigest()


def test_refuses_a_model_that_is_not_the_reviewed_one(reviewed, tmp_path, tabular_demo):
    report, _, keys = reviewed
    r = _package(report, keys, tmp_path / "x.ewb", "--model", str(tabular_demo.model_path))
    assert r.exit_code == 2 and "is not the reviewed variant" in r.output


def test_verify_detects_tampering_and_wrong_keys(reviewed, tmp_path):
    report, _, keys = reviewed
    bundle = tmp_path / "m.ewb"
    assert _package(report, keys, bundle).exit_code == 0
    data = bytearray(bundle.read_bytes())
    data[-100] ^= 1
    bad = tmp_path / "bad.ewb"
    bad.write_bytes(bytes(data))
    r = runner.invoke(app, ["verify", str(bad), "--public-key", str(keys / "signing.pub.pem"), "--key-file", str(keys / "kek.key")])
    assert r.exit_code == 1 and "tamper" in r.output.lower()
    other = tmp_path / "other"
    assert runner.invoke(app, ["keygen", "--out", str(other)]).exit_code == 0
    r = runner.invoke(app, ["verify", str(bundle), "--public-key", str(other / "signing.pub.pem"), "--key-file", str(keys / "kek.key")])
    assert r.exit_code == 1 and "signature" in r.output
    r = runner.invoke(app, ["verify", str(bundle), "--public-key", str(keys / "signing.pub.pem")])
    assert r.exit_code == 2 and "exactly one of" in r.output


def test_package_attestation_round_trip_through_a_tuf_repository(reviewed, tmp_path):
    """Produced at packaging, checked at publishing and by the device updater; a failing
    (forced) audit and a tampered attestation are refused."""
    pytest.importorskip("tuf")
    from fleet_fixtures import PASSPHRASE, StaticServer

    from hardening.errors import InputError
    from hardening.fleet import Repository
    from runtime_guard.bundle import load_public_key
    from runtime_guard.update import attestation
    from runtime_guard.update.client import FleetUpdater
    from runtime_guard.update.errors import UpdateError

    report, failing, keys = reviewed
    pub = keys / "signing.pub.pem"
    good = tmp_path / "good.ewb"
    assert _package(report, keys, good, "--json").exit_code == 0
    env = (tmp_path / "good.ewb.intoto.json").read_bytes()
    stmt = attestation.check(env, load_public_key(pub), hashlib.sha256(good.read_bytes()).hexdigest(),
                             hashlib.sha256(report.read_bytes()).hexdigest())
    assert stmt["predicate"]["verdict"]["passed"] is True
    forced = tmp_path / "forced.ewb"
    assert _package(failing, keys, forced, "--force").exit_code == 0
    repo = Repository.init(tmp_path / "repo", tmp_path / "repo-keys", PASSPHRASE.encode())
    with pytest.raises(InputError, match="attestation-verdict"):  # the publisher refuses it first
        repo.publish(forced, public_key=str(pub))
    repo.publish(good, public_key=str(pub))
    with StaticServer(tmp_path / "repo", tmp_path / "http.log") as http:
        up = FleetUpdater(http.url, tmp_path / "dev", load_public_key(pub), "d1",
                          trusted_root=tmp_path / "repo" / "metadata" / "1.root.json")
        assert up.check().statement["predicate"]["verdict"]["passed"] is True
        repo.publish(forced)  # no --public-key: only the device stands in the way
        with pytest.raises(UpdateError) as e:
            up.check()
        assert e.value.check == "attestation-verdict"
        doc = json.loads(env)  # re-signed by someone else: tampered
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        other = json.loads(attestation.sign(json.loads(__import__("base64").b64decode(doc["payload"])),
                                            Ed25519PrivateKey.generate()))
        (tmp_path / "good-v4.ewb").write_bytes(good.read_bytes())
        (tmp_path / "good-v4.ewb.intoto.json").write_text(json.dumps(other))
        repo.publish(tmp_path / "good-v4.ewb")
        with pytest.raises(UpdateError) as e:
            up.check()
        assert e.value.check == "attestation-signature"


def test_package_verifies_an_openssf_model_signature_offline(reviewed, tmp_path, monkeypatch):
    """model-signing (key-based): a good signature packages, a wrong key or a signature of
    another file is refused (exit 1), and no socket is opened while verifying."""
    pytest.importorskip("model_signing")
    import shutil
    import socket

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from model_signing import signing

    from hardening.paths import resolve

    report, _, keys = reviewed
    rep = load_report(report)
    model = resolve(rep["variants"][0]["path"], report.parent)
    pems = {}
    for name in ("publisher", "other"):
        k = ec.generate_private_key(ec.SECP256R1())
        (tmp_path / f"{name}.pem").write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        pems[name] = tmp_path / f"{name}.pub.pem"
        pems[name].write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    sig = tmp_path / "model.sig"
    signing.Config().use_elliptic_key_signer(private_key=str(tmp_path / "publisher.pem")).sign(str(model), str(sig))
    other_file = tmp_path / "other.onnx"
    shutil.copy(model, other_file)
    other_file.write_bytes(other_file.read_bytes() + b"\0")
    other_sig = tmp_path / "other.sig"
    signing.Config().use_elliptic_key_signer(private_key=str(tmp_path / "publisher.pem")).sign(str(other_file), str(other_sig))

    def no_network(*_a, **_k):
        raise AssertionError("network use during model-signature verification")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    ok = _package(report, keys, tmp_path / "ok.ewb", "--model-signature", str(sig), "--model-signing-key", str(pems["publisher"]))
    assert ok.exit_code == 0, ok.output
    for s, key in ((sig, pems["other"]), (other_sig, pems["publisher"])):
        r = _package(report, keys, tmp_path / "bad.ewb", "--model-signature", str(s), "--model-signing-key", str(key))
        assert r.exit_code == 1 and "model signature does not verify" in r.output, r.output
        assert not (tmp_path / "bad.ewb").exists()
    r = _package(report, keys, tmp_path / "bad.ewb", "--model-signature", str(sig))
    assert r.exit_code == 2 and "go together" in r.output


def test_calibrated_monitor_ships_in_the_bundle_and_the_served_guard_uses_it(reviewed, tmp_path, digits_demo):
    """calibrate-monitor -> package --monitor-config -> runtime: the signed config is the calibrated
    one, an honest client is not flagged, a uniform-noise thief is."""
    import numpy as np

    from hardening.data import load_dataset
    from hardening.paths import resolve
    from runtime_guard.bundle import load_kek
    from runtime_guard.guard import GuardedModel

    report, _, keys = reviewed
    rep = load_report(report)
    det = resolve(rep["artifacts"]["detectors"]["float"], report.parent)
    cal = tmp_path / "monitor.json"
    r = runner.invoke(app, ["calibrate-monitor", str(digits_demo.model_path), "--data", str(digits_demo.data_path),
                            "--detectors", str(det), "--target", "0.05", "--clients", "10",
                            "--calibration-clients", "60", "--stream-length", "100", "--out", str(cal), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    want = doc["config"]
    assert doc["model_sha256"] == hashlib.sha256(open(digits_demo.model_path, "rb").read()).hexdigest()
    assert len(want["center"]) == 64 and want["max_rejection_rate"] is not None and want["delta"] != 0.90

    both = _package(report, keys, tmp_path / "x.ewb", "--monitor-config", str(cal), "--calibrate-monitor", "0.05")
    assert both.exit_code == 2, both.output
    space_alone = _package(report, keys, tmp_path / "s.ewb", "--monitor-space", "features")
    assert space_alone.exit_code == 2 and "--calibrate-monitor" in space_alone.output, space_alone.output
    bad_space = _package(report, keys, tmp_path / "b.ewb", "--calibrate-monitor", "0.05", "--monitor-space", "pixels")
    assert bad_space.exit_code == 2 and "space must be one of" in bad_space.output, bad_space.output
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**doc, "model_sha256": "0" * 64}))
    assert _package(report, keys, tmp_path / "y.ewb", "--monitor-config", str(other)).exit_code == 2

    bundle = tmp_path / "m.ewb"
    r = _package(report, keys, bundle, "--monitor-config", str(cal), "--gate-action", "reject")
    assert r.exit_code == 0, r.output
    g = GuardedModel.load(bundle, keys / "signing.pub.pem", load_kek(file=keys / "kek.key"), accept=False)
    got = g.config.extraction
    assert got.delta == want["delta"] and got.min_queries == want["min_queries"]
    assert got.max_rejection_rate == want["max_rejection_rate"] and got.min_label_entropy == want["min_label_entropy"]
    assert list(got.center) == want["center"] and list(got.scale) == want["scale"]

    ds = load_dataset(digits_demo.data_path)
    rng = np.random.default_rng(3)
    honest = ds.x[rng.choice(len(ds.x), 100)].astype(np.float32)
    noise = rng.uniform(0.0, 1.0, honest.shape).astype(np.float32)
    for i in range(0, 100, 10):
        g.predict(honest[i:i + 10], "honest")
        g.predict(noise[i:i + 10], "thief")
    assert g.monitor_state("honest").flagged is False, g.monitor_state("honest")
    thief = g.monitor_state("thief")
    assert thief.flagged and thief.flag_reason == "rejections", thief


@pytest.mark.slow
def test_package_can_calibrate_the_monitor_itself(reviewed, tmp_path):
    """--calibrate-monitor: calibrated on the report's data with the shipped gate, signed into the bundle."""
    report, _, keys = reviewed
    bundle = tmp_path / "c.ewb"
    r = _package(report, keys, bundle, "--calibrate-monitor", "0.05")
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", str(bundle), "--json"])
    ext = json.loads(r.stdout)["manifest"]["runtime"]["extraction"]
    assert len(ext["center"]) == 64 and ext["delta"] != 0.90 and ext["max_rejection_rate"] is not None
    feats = tmp_path / "f.ewb"
    r = _package(report, keys, feats, "--calibrate-monitor", "0.05", "--monitor-space", "features")
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", str(feats), "--json"])
    ext_f = json.loads(r.stdout)["manifest"]["runtime"]["extraction"]
    assert ext_f["space"] == "features" and ext["space"] == "input", (ext_f["space"], ext["space"])
    assert len(ext_f["center"]) != 64  # penultimate features, not the 8x8 input
