"""Fixtures for the API tests: real signed bundles of the digits demo.

``api_keys_env`` holds a fresh Ed25519 keypair and KEK (files 0600), the
demo model bytes and a golden set (the model's own labels on test images,
computed with a bare onnxruntime session). ``make_bundle`` writes bundles
with any version / runtime policy / golden set / signing key.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
FAST_RATE = "100000/minute"


@dataclass
class ApiEnv:
    root: Path
    signing_key: bytes = field(repr=False)
    public_key_path: Path
    kek: bytes = field(repr=False)
    kek_path: Path
    model_bytes: bytes = field(repr=False)
    x: np.ndarray  # digits test inputs, float32 [N, 1, 8, 8]
    labels: np.ndarray  # bare-model predictions on x
    logits: np.ndarray
    admin_token_path: Path

    def runtime(self, per_client: str | None = FAST_RATE, anomaly: str = "off",
                threshold: float | None = None, policy: str = "full") -> dict[str, Any]:
        from runtime_guard.config import GuardConfig

        cfg: dict[str, Any] = {
            "input": {"value_range": [0.0, 1.0], "max_batch": 64},
            "rate_limit": {"per_client": per_client},
            "output": {"policy": policy},
            "extraction": {"enabled": False},
        }
        if anomaly != "off":
            cfg["anomaly"] = {"action": anomaly, "detector_meta": msp_detector_meta(threshold)}
        else:
            cfg["anomaly"] = {"action": "off"}
        return GuardConfig.from_dict(cfg).to_dict()

    def golden(self, n: int = 8, wrong: bool = False) -> dict[str, Any]:
        labels = self.labels[:n].copy()
        if wrong:
            labels = (labels + 1) % 6
        return {"inputs": self.x[:n].tolist(), "expected_labels": labels.tolist(),
                "expected_logits": self.logits[:n].tolist(), "atol": 1e-4}

    def make_bundle(self, path: Path, version: int, *, runtime: dict | None = None,
                    golden: dict | None = None, signing_key: bytes | None = None,
                    model_bytes: bytes | None = None, name: str = "digits") -> Path:
        from runtime_guard.bundle import write_bundle

        runtime = runtime if runtime is not None else self.runtime()
        payloads = {"model": model_bytes if model_bytes is not None else self.model_bytes}
        if runtime.get("anomaly", {}).get("action", "off") != "off":
            payloads["detectors.npz"] = empty_npz()
        fields = {"model": {"name": name}, "runtime": runtime,
                  "smoke_test": golden if golden is not None else self.golden()}
        write_bundle(path, payloads, fields, signing_key or self.signing_key, self.kek, version)
        return Path(path)

    def load_guard(self, bundle: Path) -> Any:
        """The bundle's ``GuardedModel`` in this process: what a server's answers must equal."""
        from runtime_guard.bundle import load_kek
        from runtime_guard.guard import GuardedModel

        return GuardedModel.load(bundle, self.public_key_path, load_kek(file=self.kek_path), accept=False)

    def serve_args(self, bundle: Path | None, *extra: str) -> list[str]:
        args = [str(bundle)] if bundle is not None else []
        return [*args, "--public-key", str(self.public_key_path), "--key-file", str(self.kek_path),
                *extra]

    def app_config(self, bundle: Path | None, **kw: Any):
        from api.config import ApiConfig

        return ApiConfig(bundle=None if bundle is None else str(bundle),
                         public_key=str(self.public_key_path), kek_file=str(self.kek_path), **kw)


def empty_npz() -> bytes:
    bio = io.BytesIO()
    np.savez(bio, unused=np.zeros(1))
    return bio.getvalue()


def msp_detector_meta(threshold: float | None) -> dict[str, Any]:
    """One max-softmax-probability detector on the logits (needs no fitted arrays)."""
    return {
        "format": "edgeward-ood/1",
        "threshold": threshold,
        "fusion": {"rule": "mean_z", "members": ["msp"]},
        "detectors": [{"name": "msp", "kind": "msp", "view": "logits",
                       "norm": {"mean": 0.0, "std": 1.0}, "threshold": threshold,
                       "params": {"temperature": 1.0}}],
    }


def _secret(path: Path, data: bytes) -> Path:
    from runtime_guard.bundle import write_secret_file

    write_secret_file(path, data)
    return path


@pytest.fixture(scope="session")
def api_env(digits_demo, tmp_path_factory) -> ApiEnv:
    import onnxruntime as ort

    from runtime_guard.bundle import generate_kek, generate_signing_keypair

    root = tmp_path_factory.mktemp("api")
    priv, pub = generate_signing_keypair()
    (root / "pub.pem").write_bytes(pub)
    kek = generate_kek()
    _secret(root / "kek.key", kek.hex().encode())
    _secret(root / "admin.token", ADMIN_TOKEN.encode())
    model_bytes = Path(digits_demo.model_path).read_bytes()
    with np.load(digits_demo.data_path, allow_pickle=False) as z:
        x = z["x"].astype(np.float32)
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    logits = sess.run([sess.get_outputs()[0].name], {sess.get_inputs()[0].name: x})[0]
    return ApiEnv(root, priv, root / "pub.pem", kek, root / "kek.key", model_bytes, x,
                  logits.argmax(axis=1), logits, root / "admin.token")


@pytest.fixture(scope="session")
def bundle_v1(api_env) -> Path:
    return api_env.make_bundle(api_env.root / "v1.ewb", 1)


def json_body(x: np.ndarray) -> str:
    return json.dumps({"inputs": np.asarray(x).tolist()})


def crashing_model(model_bytes: bytes, bad_above: float = 0.625) -> bytes:
    """The demo model plus a data-dependent fault: onnxruntime raises (Gather
    index out of bounds) when the first pixel is above ``bad_above``. It passes
    the golden set (first pixel 0) and the guard's mid-range smoke sample, so
    only live traffic exposes it -- what the error-rate rollback is for."""
    from onnx import TensorProto, helper, numpy_helper

    scale = 5.0 / bad_above  # index 5 (out of bounds for 5 entries) at bad_above
    return add_to_logits(model_bytes, [
        numpy_helper.from_array(np.array(scale, np.float32), "cf_scale"),
        numpy_helper.from_array(np.zeros(5, np.float32), "cf_table"),
    ], lambda first: [
        helper.make_node("Mul", [first, "cf_scale"], ["cf_scaled"]),
        helper.make_node("Floor", ["cf_scaled"], ["cf_floor"]),
        helper.make_node("Cast", ["cf_floor"], ["cf_idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["cf_table", "cf_idx"], ["cf_zero"], axis=0),
    ], "cf_zero")


def add_to_logits(model_bytes: bytes, initializers: list, nodes, offset: str) -> bytes:
    """The model with ``logits = raw logits + offset``, where ``nodes(first)`` (with
    ``initializers``) compute the tensor ``offset`` from ``first``, the input's first value."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load_from_string(model_bytes)
    g = m.graph
    logits = g.output[0].name
    raw = logits + "_raw"
    for node in g.node:
        node.output[:] = [raw if o == logits else o for o in node.output]
    g.initializer.extend([*initializers, *(numpy_helper.from_array(np.array([v], np.int64), f"first_{k}")
                                           for k, v in (("start", 0), ("end", 1), ("axis", 1)))])
    g.node.extend([helper.make_node("Flatten", [g.input[0].name], ["first_flat"], axis=1),
                   helper.make_node("Slice", ["first_flat", "first_start", "first_end", "first_axis"], ["first"]),
                   *nodes("first"), helper.make_node("Add", [raw, offset], [logits])])
    onnx.checker.check_model(m)
    return m.SerializeToString()
