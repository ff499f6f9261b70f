"""The reference networks are the architectures they claim to be, and what
``build_reference`` writes is what a user would bring (ONNX equal to the torch model,
a TorchScript source that loads with weights only, a data file the CLI reads)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from hardening.data import load_dataset
from hardening.reference_models import INPUT_NAME, MobileNetV3Small, ResNet18, build_reference


@pytest.mark.parametrize(("cls", "expected"), [(MobileNetV3Small, 2_542_856), (ResNet18, 11_689_512)])
def test_parameter_counts_equal_torchvisions_imagenet_models(cls, expected):
    # torchvision.models.mobilenet_v3_small() / resnet18() at 1000 classes
    assert sum(p.numel() for p in cls(num_classes=1000).parameters()) == expected


def test_build_reference_writes_a_model_the_session_and_torchscript_agree_on(tmp_path):
    ref = build_reference("mobilenet_v3_small", tmp_path, size=24, channels=2, epochs=1)
    ds = load_dataset(ref.data_path)
    assert ds.sample_shape == (2, 24, 24) and ds.x_thief is not None
    sess = ort.InferenceSession(ref.model_path, providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == INPUT_NAME
    x = ds.x[:5]
    ts = torch.jit.load(ref.torchscript_path)
    with torch.no_grad():
        expect = ts(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(None, {INPUT_NAME: x})[0], expect, atol=1e-4, rtol=1e-4)
