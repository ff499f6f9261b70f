"""The CLI's exit-code contract (0 ok, 1 check failed, 2 input, 3 internal), --version,
--debug, partial reviews, data with only x/y, and quantization without spurious warnings."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from hardening.cli import app
from hardening.cli.common import Settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_debug():
    Settings.debug = False
    yield
    Settings.debug = False


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("edgeward ")


def _explode(*_a, **_k):
    raise RuntimeError("library went wrong\nsecond line")


def test_internal_error_is_exit_3_with_one_line(monkeypatch, tmp_path):
    import hardening.report as report

    monkeypatch.setattr(report, "load_report", _explode)  # stands in for an unanticipated bug
    r = runner.invoke(app, ["gate", str(tmp_path / "a.json"), "--baseline", str(tmp_path / "b.json")])
    assert r.exit_code == 3
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "internal error: RuntimeError: library went wrong" in lines[0], r.output
    assert "--debug" in lines[0] and "Traceback" not in r.output


def test_debug_shows_the_traceback(monkeypatch, tmp_path):
    import hardening.report as report

    monkeypatch.setattr(report, "load_report", _explode)
    r = runner.invoke(app, ["--debug", "gate", str(tmp_path / "a.json"), "--baseline", str(tmp_path / "b.json")])
    assert r.exit_code == 3 and "Traceback" in r.output and "_explode" in r.output


def test_input_errors_stay_exit_2_and_keep_brackets(tmp_path):
    r = runner.invoke(app, ["gate", str(tmp_path / "missing.json"), "--baseline", str(tmp_path / "b.json")])
    assert r.exit_code == 2 and r.output.startswith("error:")
    bad = tmp_path / "budgets.toml"
    bad.write_text("[budgets]\nmax_memory_mb = 'lots'\n")
    from hardening.errors import InputError
    from hardening.profiling import Budgets

    with pytest.raises(InputError, match=r"\[budgets\] max_memory_mb must be a number"):
        Budgets.from_toml(bad)


def test_partial_review_is_incomplete_unless_allowed(digits_demo, tmp_path):
    base = ["audit", str(digits_demo.model_path), "--data", str(digits_demo.data_path), "--kinds", "float",
            "--areas", "profiling"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert r.exit_code == 1, r.output
    assert "INCOMPLETE" in r.output and "skipped" in r.output and "PASS" not in r.output
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--allow-skipped", "--json"])
    assert r.exit_code == 0, r.output
    import json

    verdict = json.loads(r.stdout)["verdict"]
    assert verdict["passed"] and verdict["allow_skipped"] and verdict["skipped_checks"] > 0
    assert verdict["headline"].startswith("PASS (partial)")


def test_data_with_only_x_and_y_fits(digits_demo, tmp_path):
    from hardening.data import load_dataset
    from hardening.intake import check_fits, load_model

    with np.load(digits_demo.data_path, allow_pickle=False) as z:
        np.savez(tmp_path / "xy.npz", x=z["x"], y=z["y"])
        bad_y = z["y"].copy()
    check_fits(load_model(digits_demo.model_path), load_dataset(tmp_path / "xy.npz"))
    bad_y[0] = 99
    np.savez(tmp_path / "bad.npz", x=np.load(tmp_path / "xy.npz")["x"], y=bad_y)
    from hardening.errors import DataError

    with pytest.raises(DataError, match="label 99 is out of range"):
        check_fits(load_model(digits_demo.model_path), load_dataset(tmp_path / "bad.npz"))


def test_quantizers_get_preprocessed_models(digits_demo, tmp_path, caplog):
    from hardening.compression import compress

    with caplog.at_level(logging.WARNING):
        vs = compress(digits_demo.model_path, digits_demo.data_path, tmp_path, kinds=("int8_static", "int8_dynamic"))
    assert [v.recipe["pre_process"] for v in vs] == ["quant_pre_process"] * 2
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
