"""Issue 2: demo models, intake, data validation, compression and profiling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from hardening.cli import app
from hardening.data import load_dataset
from hardening.errors import DataError, ModelError
from hardening.intake import check_fits, load_model

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_demo_is_deterministic_and_exports_features(digits_demo, tmp_path):
    from hardening.demo import build_demo

    again = build_demo("digits", tmp_path / "again")
    assert Path(again.model_path).read_bytes() == Path(digits_demo.model_path).read_bytes()
    info = load_model(digits_demo.model_path)
    assert info.features_output == "features" and info.num_classes == 6 and info.layout == "nchw"
    assert info.input_shape[0] is None  # dynamic batch
    ds = load_dataset(digits_demo.data_path)
    assert {"heldout"} <= set(ds.ood) and ds.x_cal is not None and ds.x_thief is not None
    sess = ort.InferenceSession(digits_demo.model_path, providers=["CPUExecutionProvider"])
    logits, feats = sess.run(None, {"input": ds.x[:7]})
    assert logits.shape == (7, 6) and feats.shape[0] == 7
    assert (logits.argmax(1) == ds.y[:7]).mean() > 0.7
    assert digits_demo.test_accuracy > 0.95


def test_tabular_demo(tabular_demo):
    info = load_model(tabular_demo.model_path)
    assert info.layout == "flat" and info.num_classes == 2
    assert tabular_demo.test_accuracy > 0.9


def test_static_int8_size_and_accuracy(digits_variants, digits_demo):
    by = {v.kind: v for v in digits_variants}
    assert set(by) == {"float", "int8_static", "int8_dynamic", "pruned_unstructured", "pruned_structured"}
    ratio = Path(by["int8_static"].path).stat().st_size / Path(by["float"].path).stat().st_size
    assert ratio <= 0.30, ratio
    ds = load_dataset(digits_demo.data_path)

    def acc(path):
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return float((s.run(["logits"], {"input": ds.x})[0].argmax(1) == ds.y).mean())

    assert abs(acc(by["int8_static"].path) - acc(by["float"].path)) <= 0.01
    assert by["int8_static"].recipe["format"] == "QDQ"
    ops = {n.op_type for n in onnx.load(by["int8_static"].path).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert by["pruned_unstructured"].recipe["achieved_weight_sparsity"] == pytest.approx(0.5, abs=0.01)
    w = [onnx.numpy_helper.to_array(t) for t in onnx.load(by["pruned_unstructured"].path).graph.initializer if t.name.endswith("weight")]
    zeros = sum(int((a == 0).sum()) for a in w) / sum(a.size for a in w)
    assert zeros == pytest.approx(0.5, abs=0.01)


def test_profile_json_has_every_field(digits_variants, digits_demo, tmp_path):
    vfile = Path(digits_variants[0].path).parent / "variants.json"
    budgets = tmp_path / "b.toml"
    budgets.write_text("[budgets]\nmax_size_kb = 100\nmin_accuracy = 0.9\n")
    r = _run("profile", str(vfile), "--data", digits_demo.data_path, "--runs", "20", "--budgets", str(budgets), "--json")
    assert r.exit_code == 1, r.output  # float and pruned variants are above 100 KiB
    doc = json.loads(r.stdout)
    assert len(doc["variants"]) == 5
    for v in doc["variants"]:
        for key in ("accuracy", "agreement_with_float", "size_bytes", "threads", "cold_start_ms", "memory_added_mb",
                    "cpu_ms_per_inference", "energy_source", "budget_checks"):
            assert key in v
        assert [lat["batch"] for lat in v["latency"]] == [1, 32]
        assert all(lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] for lat in v["latency"])
        assert v["cold_start_ms"] > 0 and v["memory_added_mb"] >= 0
        by_batch = v["memory_by_batch"]
        assert [m["batch"] for m in by_batch] == sorted(m["batch"] for m in by_batch) and by_batch[0]["batch"] == 1
        assert v["memory_added_mb"] == by_batch[0]["memory_added_mb"]
        assert all(a["memory_added_mb"] <= b["memory_added_mb"] for a, b in zip(by_batch, by_batch[1:]))
        if v["energy_mj_per_inference"] is None:
            assert v["energy_source"].startswith("unavailable")
    by = {v["name"]: v for v in doc["variants"]}
    assert by["int8_static"]["budget_checks"] == {"max_size_kb": True, "min_accuracy": True}
    assert by["float"]["budget_checks"]["max_size_kb"] is False
    assert by["float"]["agreement_with_float"] == 1.0


# --- bad inputs: exit code 2 and a one-line error naming the problem -------------------------------


def _bad(tmp_path, digits_demo):
    ds = dict(np.load(digits_demo.data_path, allow_pickle=False))
    cases = {}
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 20)
    cases["corrupt"] = (str(corrupt), digits_demo.data_path, "not a valid ONNX model")
    wrong = tmp_path / "wrong_shape.npz"
    np.savez(wrong, **{**ds, "x": ds["x"].reshape(len(ds["x"]), 64), "x_train": ds["x_train"].reshape(-1, 64),
                       "x_cal": ds["x_cal"].reshape(-1, 64), "x_thief": ds["x_thief"].reshape(-1, 64),
                       "ood_heldout": ds["ood_heldout"].reshape(-1, 64)})
    cases["shape"] = (digits_demo.model_path, str(wrong), "samples have shape (64,)")
    nan = tmp_path / "nan.npz"
    x = ds["x"].copy()
    x[3, 0, 2, 2] = np.nan
    np.savez(nan, **{**ds, "x": x})
    cases["nan"] = (digits_demo.model_path, str(nan), "NaN/Inf values (first at index (3, 0, 2, 2))")
    missing = tmp_path / "missing.npz"
    np.savez(missing, x=ds["x"])
    cases["missing"] = (digits_demo.model_path, str(missing), "missing required array 'y'")
    model = onnx.load(digits_demo.model_path)
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    onnx.save_model(model, str(ext_dir / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    cases["external"] = (str(ext_dir / "m.onnx"), digits_demo.data_path, "external data")
    return cases


@pytest.mark.parametrize("case", ["corrupt", "shape", "nan", "missing", "external"])
def test_bad_inputs_exit_2_with_one_line(case, tmp_path, digits_demo):
    model, data, needle = _bad(tmp_path, digits_demo)[case]
    r = _run("compress", model, "--data", data, "--out", str(tmp_path / "o"), "--variants", "float,int8_dynamic")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert needle in " ".join(r.stderr.split()), r.stderr


def test_intake_refuses_oversize_and_label_mismatch(digits_demo, tmp_path):
    with pytest.raises(ModelError, match="above the 1000-byte limit"):
        load_model(digits_demo.model_path, max_bytes=1000)
    ds = load_dataset(digits_demo.data_path)
    ds.y = ds.y.copy()
    ds.y[0] = 9
    with pytest.raises(DataError, match="label 9 is out of range for a 6-class model"):
        check_fits(load_model(digits_demo.model_path), ds)


def test_object_arrays_are_refused(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([object(), 1], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DataError, match="object arrays are not allowed"):
        load_dataset(p)


def test_torch_source_state_dict_and_torchscript(digits_demo, tmp_path):
    import torch

    from hardening.torch_source import load_torch_source

    m = load_torch_source(digits_demo.torch_path)
    ds = load_dataset(digits_demo.data_path)
    sess = ort.InferenceSession(digits_demo.model_path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = m(torch.from_numpy(ds.x[:16]))[0].numpy()
    np.testing.assert_allclose(ref, sess.run(["logits"], {"input": ds.x[:16]})[0], atol=1e-4)
    scripted = tmp_path / "ts.pt"
    torch.jit.script(m).save(str(scripted))
    with torch.no_grad():
        np.testing.assert_allclose(load_torch_source(scripted)(torch.from_numpy(ds.x[:4]))[0].numpy(), ref[:4], atol=1e-5)
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a PyTorch file"):
        load_torch_source(tmp_path / "bad.pt")


def test_console_script_help_and_usage_error():
    exe = Path(sys.executable).parent / "edgeward"
    for cmd in (["--help"], ["compress", "--help"], ["profile", "--help"], ["demo-model", "--help"]):
        assert subprocess.run([str(exe), *cmd], capture_output=True).returncode == 0
    r = subprocess.run([str(exe), "compress"], capture_output=True, text=True)
    assert r.returncode == 2
