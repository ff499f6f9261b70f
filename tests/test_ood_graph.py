"""Adding a penultimate-feature output by graph edit leaves the logits unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from hardening.data import load_dataset
from hardening.errors import ModelError
from hardening.intake import load_model, make_session
from hardening.ood import add_feature_output, audit_ood, find_penultimate, fit_ood


@pytest.fixture(scope="module")
def stripped(digits_demo, tmp_path_factory):
    """The digits demo model with its 'features' output removed."""
    m = onnx.load(digits_demo.model_path)
    keep = [o for o in m.graph.output if o.name != "features"]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    path = tmp_path_factory.mktemp("stripped") / "logits_only.onnx"
    onnx.save(m, str(path))
    assert load_model(path).features_output is None
    return path


def test_auto_pick_restores_the_features(digits_demo, stripped):
    ds = load_dataset(digits_demo.data_path)
    x = ds.x[:50]
    logits, feats = make_session(digits_demo.model_path).run(["logits", "features"], {"input": x})
    data = Path(stripped).read_bytes()
    assert find_penultimate(onnx.load_from_string(data), "logits") == "features"
    edit = add_feature_output(data, "input", "logits", x)
    assert edit.chosen_by == "final_linear" and edit.tensor == "features" and edit.max_logit_diff == 0.0
    got_logits, got_feats = make_session(edit.model_bytes).run(["logits", edit.features_output], {"input": x})
    np.testing.assert_array_equal(got_logits, logits)
    np.testing.assert_array_equal(got_feats, feats)


def test_user_named_tensor_and_bad_names(digits_demo, stripped):
    x = load_dataset(digits_demo.data_path).x[:8]
    data = Path(stripped).read_bytes()
    tensors = {o for n in onnx.load_from_string(data).graph.node if n.op_type == "Gemm" for o in n.output}
    pre_relu = sorted(tensors - {"logits"})[0]
    edit = add_feature_output(data, "input", "logits", x, tensor=pre_relu, output_name="feat")
    assert edit.chosen_by == "user" and edit.tensor == pre_relu
    with pytest.raises(ModelError, match="not produced"):
        add_feature_output(data, "input", "logits", x, tensor="no_such_tensor")
    with pytest.raises(ModelError, match="already has an output"):
        add_feature_output(data, "input", "logits", x, output_name="logits")


def test_no_final_linear_is_a_model_error():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 3])
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    with pytest.raises(ModelError, match="Gemm/MatMul"):
        find_penultimate(onnx.helper.make_model(g), "y")


def test_fit_and_audit_on_a_logits_only_model(digits_demo, stripped, tmp_path):
    rep = fit_ood(stripped, digits_demo.data_path, tmp_path / "det", alpha=0.05)
    assert rep.features_tensor == "features"
    audit = audit_ood(stripped, digits_demo.data_path, tmp_path / "det", tmp_path / "audit", n_synthetic=50, plots=False)
    assert audit.get("inverted").auroc > 0.95
    with pytest.raises(ModelError, match="different model"):
        audit_ood(digits_demo.model_path, digits_demo.data_path, tmp_path / "det", tmp_path / "a2", n_synthetic=20, plots=False)
