"""``edgeward audit robustness`` end to end: JSON output, files, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from hardening.cli import app

runner = CliRunner()


def _run(*args: str):
    res = runner.invoke(app, ["audit", "robustness", *args])
    return res, res.output  # stdout and stderr, as a user sees them


def test_json_output_and_out_dir(digits_demo, tmp_path):
    res, text = _run(str(digits_demo.model_path), "--data", str(digits_demo.data_path), "--torch-source",
                     str(digits_demo.torch_path), "--n", "16", "--eps", "0.1", "--attacks", "fgsm,square",
                     "--json", "--out", str(tmp_path))
    assert res.exit_code == 0, text
    d = json.loads(res.stdout)
    v = d["variants"][0]
    assert d["norm"] == "inf" and d["eps"] == [0.1] and v["role"] == "white-box"
    assert 0.0 <= v["eps"][0]["robust_accuracy"] <= v["clean_accuracy"]
    assert json.loads((tmp_path / "robustness.json").read_text())["n"] == 16


def test_table_output_from_variants_json(digits_variants, digits_demo, tmp_path):
    src = Path(digits_variants[0].path).parent / "variants.json"
    rows = [r for r in json.loads(src.read_text()) if r["kind"] in ("float", "int8_static")]
    for r in rows:  # a hand-written variants.json elsewhere: paths relative to it, or absolute
        r["path"] = str(src.parent / r["path"])
    vj = tmp_path / "variants.json"
    vj.write_text(json.dumps(rows))
    res, text = _run(str(vj), "--data", str(digits_demo.data_path), "--n", "12", "--eps", "0.1",
                     "--attacks", "fgsm,square", "--no-self-checks")
    assert res.exit_code == 0, text
    assert "int8_static" in text and "bpda" in text and "Robust accuracy" in text


def test_bad_inputs_exit_2_with_one_line(digits_demo, tabular_demo):
    base = [str(digits_demo.model_path), "--data", str(digits_demo.data_path)]
    cases = [
        (base + ["--eps", "1.5"], "outside the data range"),
        (base + ["--eps", "a,b"], "comma-separated"),
        (base + ["--attacks", "pgd,zoo"], "unknown attack"),
        (base + ["--norm", "1"], "norm"),
        ([str(digits_demo.model_path), "--data", str(tabular_demo.data_path)], "shape"),
        (["missing.onnx", "--data", str(digits_demo.data_path)], "not found"),
    ]
    for args, msg in cases:
        res, text = _run(*args)
        assert res.exit_code == 2, (args, text)
        assert msg in text and "Traceback" not in text
        assert len([ln for ln in text.splitlines() if "error" in ln]) == 1
