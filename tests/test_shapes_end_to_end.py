"""Every release command on models edgeward did not build and that are not 8x8: a 3x16x16
RGB CNN with a TorchScript source and an ONNX-only MLP on 30 flat features, both with
input names of their own. `audit` (quick, every area), `package`, `verify` and `serve`
must end 0 or 1 (a check may fail) and never 2: no step may assume the demo's shape.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from torch import nn

from foreign_models import export, train
from servers import ServerProcess

EW = [sys.executable, "-m", "hardening"]
# Small enough for CI: 16 robustness points at one epsilon, the default extraction grid.
POLICY = """[robustness]
min_robust_accuracy = [{eps = 0.03, min = 0.0}]
n = 16
"""


class RGBNet(nn.Module):
    """Not a zoo architecture: three convs, global pooling, a linear head."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, classes)

    def logits(self, x):
        return self.head(self.body(x))

    def forward(self, x):
        return self.logits(x)


class FlatNet(nn.Module):
    def __init__(self, d: int = 30, classes: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, classes))

    def forward(self, x):
        return self.net(x)


def _splits(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    p = np.random.default_rng(seed).permutation(len(x))
    x, y = x[p], y[p]
    n = len(x)
    a, b = n // 2, (3 * n) // 4
    return {"x_train": x[:a], "y_train": y[:a], "x_cal": x[a:b], "y_cal": y[a:b], "x": x[b:], "y": y[b:]}


def _rgb_model(root: Path) -> tuple[Path, Path, Path]:
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = d.target < 4
    img = torch.from_numpy((d.images[keep] / 16.0).astype(np.float32))[:, None]
    img = torch.nn.functional.interpolate(img, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    tint = torch.tensor([1.0, 0.7, 0.4])[None, :, None, None]
    x = (img.repeat(1, 3, 1, 1) * tint).numpy()
    y = d.target[keep].astype(np.int64)
    model = train(RGBNet(), x, y, steps=150)
    onnx_path = export(model, x, root / "rgb.onnx", "pixels", "class_scores")
    ts = root / "rgb.ts.pt"
    torch.jit.trace(model, torch.from_numpy(x[:2])).save(str(ts))
    data = root / "rgb.npz"
    np.savez(data, **_splits(x, y))
    return onnx_path, data, ts


def _flat_model(root: Path) -> tuple[Path, Path]:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = ((d.data - d.data.min(0)) / (d.data.max(0) - d.data.min(0))).astype(np.float32)
    y = d.target.astype(np.int64)
    model = train(FlatNet(), x, y, steps=200)
    onnx_path = export(model, x, root / "flat.onnx", "measurements", "out")
    data = root / "flat.npz"
    np.savez(data, **_splits(x, y))
    return onnx_path, data


def _ew(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    from servers import _env

    return subprocess.run([*EW, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("kind", ["rgb_torchscript", "flat_onnx_only"])
def test_release_flow_on_models_of_other_shapes(kind, tmp_path):
    if kind == "rgb_torchscript":
        model, data, src = _rgb_model(tmp_path)
        source = ["--torch-source", str(src)]
    else:
        model, data = _flat_model(tmp_path)
        source = []
    (tmp_path / "policy.toml").write_text(POLICY)
    r = _ew(["audit", str(model), "--data", str(data), *source, "--policy", "policy.toml", "--out", "review",
             "--kinds", "float,int8_static,pruned_unstructured"], tmp_path)
    assert r.returncode in (0, 1), f"audit exited {r.returncode}:\n{r.stderr[-3000:]}"
    import json

    report = json.loads((tmp_path / "review" / "report.json").read_text())
    assert report["results"]["extraction"] and report["results"]["ood"] and report["results"]["robustness"]
    thief = report["results"]["extraction"]["variants"]["float"]["thief"]
    assert thief["arch"] == ("image_cnn" if kind == "rgb_torchscript" else "tabular_mlp")  # sized for the victim
    assert thief["in_dist_data"].startswith("x_train")  # no x_thief in these data files
    pruned = next((v for v in report["variants"] if v["kind"] == "pruned_unstructured"), None)
    if pruned is not None:  # TorchScript harden cannot rebuild, or no source: zeroed on the graph, sparsity chosen
        assert pruned["recipe"]["tool"].startswith("edgeward.onnx_pruning") and pruned["recipe"]["selection"]["grid"]
    else:  # or left out, and the report says why
        assert any(f["code"] == "VARIANT_SKIPPED" and f["variant"] == "pruned_unstructured" for f in report["findings"])

    assert _ew(["keygen", "--out", "keys"], tmp_path).returncode == 0
    r = _ew(["package", "review/report.json", "--variant", "int8_static", "--out", "m.ewb", "--version", "1",
             "--signing-key", "keys/signing.pem", "--key-file", "keys/kek.key", "--force"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _ew(["verify", "m.ewb", "--public-key", "keys/signing.pub.pem", "--key-file", "keys/kek.key",
             "--report", "review/report.json"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    args = ["m.ewb", "--public-key", str(tmp_path / "keys/signing.pub.pem"), "--key-file",
            str(tmp_path / "keys/kek.key")]
    with np.load(data, allow_pickle=False) as z:
        x = z["x"][:3]
    shutil.copy(tmp_path / "m.ewb", tmp_path / "serve.ewb")
    args[0] = str(tmp_path / "serve.ewb")
    with ServerProcess(args, tmp_path / "server.log") as srv:
        r = requests.post(srv.url + "/v1/predict", json={"inputs": x.tolist()}, timeout=10)
        assert r.status_code in (200, 422), r.text  # 422: the gate may reject an input
        meta = requests.get(srv.url + "/v1/model", timeout=5).json()
        assert meta["input"]["sample_shape"] == list(x.shape[1:])


@pytest.mark.slow
def test_realistic_flow_small(tmp_path):
    """benchmarks/bench_realistic.py's run_flow (every command, as a user runs them) on a
    MobileNetV3-small at 3x32x32: audit with the TorchScript source and ONNX-only, package,
    verify, serve + JSON and npy predictions; every stage exits 0 or 1."""
    import importlib.util

    from hardening.reference_models import build_reference

    torch.set_num_threads(1)
    ref = build_reference("mobilenet_v3_small", tmp_path / "ref", size=32, epochs=2)
    spec = importlib.util.spec_from_file_location(
        "bench_realistic", Path(__file__).resolve().parent.parent / "benchmarks" / "bench_realistic.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    stages = bench.run_flow("mobilenet_3x32x32", Path(ref.model_path), Path(ref.data_path),
                            Path(ref.torchscript_path), tmp_path / "flow", log=None)
    assert [s.name for s in stages] == ["audit_torchscript", "keygen", "package", "verify", "serve",
                                        "audit_onnx_only"], bench.table(stages)
    bad = [f"{s.name} exited {s.exit_code}: {s.note}\n{s.stderr_tail}" for s in stages if not s.ok]
    assert not bad, "\n".join(bad)
    serve = stages[-2]
    assert "same answer" in serve.note and "UNEXPECTED" not in serve.note, serve.note


def test_image_thief_stem_scales_with_the_input():
    """The default image thief's first block is strided for large inputs (its training cost
    was most of a 3x96x96 quick audit) and unchanged for small ones."""
    from attacks.architectures import ImageCNN
    from attacks.extraction import thief_spec_for

    assert thief_spec_for((3, 16, 16), 4).kwargs["stem_stride"] == 1
    assert thief_spec_for((3, 32, 32), 10).kwargs["stem_stride"] == 1
    assert thief_spec_for((3, 224, 224), 10).kwargs["stem_stride"] == 4
    spec = thief_spec_for((3, 96, 96), 10)
    assert spec.arch == "image_cnn" and spec.kwargs["stem_stride"] == 2
    model = ImageCNN(**spec.kwargs)
    assert model.blocks[0](torch.zeros(2, 3, 96, 96)).shape == (2, 16, 48, 48)
    logits, features = model(torch.zeros(2, 3, 96, 96))
    assert logits.shape == (2, 10) and features.shape == (2, 64)
