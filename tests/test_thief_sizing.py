"""The default extraction thief is sized for the victim (issue 15): an image thief whose
receptive field spans the input whatever its size, an MLP for flat inputs, and a thief that
can actually steal a small non-8x8 image model at the quick profile's top budget (else the
extraction self-check fails and the review says nothing about the guarded model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attacks.architectures import ImageCNN
from attacks.errors import InputError
from attacks.extraction import LAST_MAP, POOL_GRID, ThiefSpec, image_thief_kwargs, thief_spec_for


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 32, 32), (1, 28, 28), (3, 96, 96), (3, 224, 224), (3, 40, 72)])
def test_image_thief_last_map_spans_the_input(shape):
    """Before: three blocks and global pooling at any size, so at 3x96x96 the last map was
    12x12 (a 15 px receptive field) and the layout was averaged away: 0.18 fidelity."""
    spec = thief_spec_for(shape, 10)
    assert spec.arch == "image_cnn"
    model = ImageCNN(**spec.kwargs).eval()
    with torch.no_grad():
        last = model.blocks(torch.zeros(1, *shape))
        logits, feats = model(torch.zeros(2, *shape))
    assert max(last.shape[2:]) <= LAST_MAP, (shape, last.shape, spec.kwargs)
    assert min(last.shape[2:]) >= POOL_GRID and spec.kwargs["grid"] == POOL_GRID
    assert logits.shape == (2, 10) and feats.shape == (2, spec.kwargs["feature_dim"])


def test_image_thief_blocks_and_width_follow_size_and_classes():
    assert [image_thief_kwargs(s, 10)["blocks"] for s in [(3, 16, 16), (3, 32, 32), (3, 96, 96), (3, 224, 224)]] \
        == [3, 4, 4, 5]
    small, many = image_thief_kwargs((3, 32, 32), 10), image_thief_kwargs((3, 32, 32), 100)
    assert (small["width"], small["feature_dim"]) == (16, 64)
    assert (many["width"], many["feature_dim"]) == (32, 200)
    assert thief_spec_for((3, 96, 96), 10, arch="image_cnn").kwargs == image_thief_kwargs((3, 96, 96), 10)


def test_flat_inputs_get_an_mlp_and_the_demo_its_cnn():
    flat = thief_spec_for((30,), 2)
    assert flat.arch == "tabular_mlp" and flat.kwargs == {"in_features": 30, "num_classes": 2}
    assert thief_spec_for((1, 8, 8), 6).arch == "digits_cnn"
    with pytest.raises(InputError):
        thief_spec_for((30,), 2, arch="image_cnn")


def test_a_victims_own_image_cnn_sidecar_keeps_its_layers(tmp_path):
    """A torch source with an architecture sidecar: the thief is that family with those layers."""
    src = tmp_path / "model.pt"
    src.write_bytes(b"")
    src.with_suffix(".json").write_text(json.dumps({"arch": "image_cnn", "kwargs": {"width": 8, "num_classes": 4}}))
    spec = thief_spec_for((3, 96, 96), 4, torch_source=src)
    assert spec.kwargs == {"width": 8, "num_classes": 4, "in_channels": 3}


def test_one_cycle_schedule_anneals_each_fit():
    spec = ThiefSpec(arch="image_cnn")
    opt = torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=spec.lr)
    sched = spec.scheduler(opt, epochs=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(spec.lr, rel=0.05) and lrs[0] < spec.lr / 5 and lrs[-1] < spec.lr / 5
    assert ThiefSpec(arch="image_cnn", lr_schedule="constant").scheduler(opt, 10) is None
    with pytest.raises(InputError):
        ThiefSpec(arch="image_cnn", lr_schedule="cosine?").scheduler(opt, 10)


class _Net(nn.Module):
    """Not a zoo architecture: three convs and a linear head over the flattened 4x4 map."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                               nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                               nn.Linear(32 * 16, 10))

    def forward(self, x):
        return self.f(x)


def _tiny_rgb_victim(root: Path) -> tuple[Path, Path]:
    """10-class digits at 3x16x16 (the reference models' data), trained ~5 s, exported to ONNX."""
    from benchmarks._models import export
    from hardening.reference_models import upsampled_digits

    sp = upsampled_digits(16, 3, 0)
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(sp["x_train"]), torch.from_numpy(sp["y_train"])
    for _ in range(200):
        idx = torch.randint(0, len(xt), (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
        opt.step()
    model.eval()
    data = root / "data.npz"
    np.savez(data, **sp)
    return export(model, sp["x"], root / "model.onnx", "pixels", "scores"), data


def test_default_thief_steals_a_3x16x16_model_at_the_quick_budget(tmp_path):
    """The quick profile's extraction settings, its top budget only (what the self-check judges)."""
    from hardening.extraction_audit import run_extraction_audit
    from hardening.report.policy import Policy
    from hardening.report.runners.extraction import extraction_kwargs

    model, data = _tiny_rgb_victim(tmp_path)
    kw = extraction_kwargs(Policy(), "quick", 0)
    kw["budgets"] = kw["budgets"][-1:]
    rep = run_extraction_audit(model, data, **kw)
    assert rep.thief["arch"] == "image_cnn" and rep.thief["kwargs"]["grid"] == POOL_GRID
    assert rep.self_check.passed, rep.self_check.message
    assert rep.self_check.budget == 500 and rep.self_check.fidelity >= 0.85
