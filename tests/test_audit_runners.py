"""The full audit's runners: stage measurement, OOD family shards checkpointed and resumed, and
the ``audit`` command's executor options."""

from __future__ import annotations

import time

import numpy as np
from typer.testing import CliRunner

from hardening.cli import app
from hardening.executor.usage import measure
from hardening.report import Policy, run_full_audit


def test_measure_gives_each_block_its_own_peak_memory():
    with measure() as idle:
        time.sleep(0.05)
    with measure() as big:
        a = np.ones(160 * 2**20 // 8)  # 160 MiB, written, so resident
        a.sum()
        del a
    with measure() as small:
        b = np.ones(48 * 2**20 // 8)  # above glibc's largest mmap threshold (32 MiB): fresh pages, never reused heap
        time.sleep(0.1)
        del b
    assert big.peak_rss_mb >= idle.peak_rss_mb + 150
    # not the process's lifetime high-water mark: a later, smaller block reports its own peak
    assert idle.peak_rss_mb + 30 <= small.peak_rss_mb < big.peak_rss_mb - 80
    assert 0.1 <= small.seconds < 5


def _ood_audit(demo, out, **kw):
    p = Policy()
    p.robustness.n = 8
    return run_full_audit(demo.model_path, demo.data_path, out, torch_source=demo.torch_path, kinds=("float",),
                          areas=("ood",), policy=p, sizes={"ood_synthetic": 50}, allow_skipped=True, **kw)


def test_ood_shards_are_checkpointed_and_resume_redoes_only_the_missing_one(digits_demo, tmp_path):
    first = _ood_audit(digits_demo, tmp_path).report
    shards = first["provenance"]["ood_shards"]
    assert len(shards) >= 6 and all((tmp_path / "shards" / f"{s['id']}.json").is_file() for s in shards)
    lost = shards[2]  # as if the driver died before this one finished
    (tmp_path / "shards" / f"{lost['id']}.json").unlink()
    again = _ood_audit(digits_demo, tmp_path, resume=True).report
    redone = [s["id"] for s in again["provenance"]["ood_shards"] if not s["resumed"]]
    assert redone == [lost["id"]]
    assert again["results"]["ood"]["variants"]["float"]["metrics"] == first["results"]["ood"]["variants"]["float"]["metrics"]
    assert again["provenance"]["executor"]["resume"] is True


def test_audit_executor_options_are_checked_before_any_work(digits_demo, tmp_path):
    base = ["audit", str(digits_demo.model_path), "--data", str(digits_demo.data_path), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, [*base, "--executor", "spark"])
    assert res.exit_code == 2 and "unknown --executor 'spark'" in res.output
    res = CliRunner().invoke(app, [*base, "--executor", "ray://nohost"])
    assert res.exit_code == 2 and "ray://HOST:PORT" in res.output
    res = CliRunner().invoke(app, [*base, "--workers", "0"])
    assert res.exit_code == 2 and "--workers must be a positive integer" in res.output
    assert not (tmp_path / "o").exists()
