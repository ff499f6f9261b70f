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
    with pytest.raises(ModelError, match="classifier head"):
        find_penultimate(onnx.helper.make_model(g), "y")


def test_fit_and_audit_on_a_logits_only_model(digits_demo, stripped, tmp_path):
    rep = fit_ood(stripped, digits_demo.data_path, tmp_path / "det", alpha=0.05)
    assert rep.features_tensor == "features"
    audit = audit_ood(stripped, digits_demo.data_path, tmp_path / "det", tmp_path / "audit", n_synthetic=50, plots=False)
    assert audit.get("inverted").auroc > 0.95
    with pytest.raises(ModelError, match="different model"):
        audit_ood(digits_demo.model_path, digits_demo.data_path, tmp_path / "det", tmp_path / "a2", n_synthetic=20, plots=False)


def _graph_model(nodes, inits, in_shape, out_name="logits"):
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", *in_shape])
    y = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["n", "k"])
    g = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m.SerializeToString()


def test_heads_of_real_graphs(digits_variants):
    """MatMul + Add with a transposed weight, a 1x1-conv head after global pooling with a
    final Softmax, and int8 (QDQ static, dynamic) variants: each finds the float tensor that
    feeds the head, and exposing it leaves the outputs unchanged."""
    from onnx import helper

    rng = np.random.default_rng(0)
    x_flat = rng.normal(size=(8, 6)).astype(np.float32)
    matmul = _graph_model(
        [helper.make_node("Relu", ["input"], ["hidden"]),
         helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
         helper.make_node("MatMul", ["hidden", "wt"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["logits"])],
        {"w": rng.normal(size=(3, 6)).astype(np.float32), "b": np.zeros(3, np.float32)}, [6])
    assert find_penultimate(onnx.load_from_string(matmul), "logits") == "hidden"
    add_feature_output(matmul, "input", "logits", x_flat)

    x_img = rng.normal(size=(4, 5, 7, 7)).astype(np.float32)
    conv_head = _graph_model(
        [helper.make_node("Relu", ["input"], ["act"]),
         helper.make_node("GlobalAveragePool", ["act"], ["pooled"]),
         helper.make_node("Conv", ["pooled", "k"], ["scores"], kernel_shape=[1, 1]),
         helper.make_node("Flatten", ["scores"], ["flat"]),
         helper.make_node("Softmax", ["flat"], ["logits"], axis=1)],
        {"k": rng.normal(size=(3, 5, 1, 1)).astype(np.float32)}, [5, 7, 7])
    assert find_penultimate(onnx.load_from_string(conv_head), "logits") == "pooled"
    edit = add_feature_output(conv_head, "input", "logits", x_img)
    assert edit.tensor == "pooled"

    for v in digits_variants:
        if v.kind not in ("int8_static", "int8_dynamic"):
            continue
        info = load_model(v.path)
        m = onnx.load(v.path)  # logits only, as a user's int8 export would be
        keep = [o for o in m.graph.output if o.name == info.logits_output]
        del m.graph.output[:]
        m.graph.output.extend(keep)
        data = m.SerializeToString()
        tensor = find_penultimate(m, info.logits_output)
        xs = rng.uniform(0, 1, size=(6, 1, 8, 8)).astype(np.float32)
        edit = add_feature_output(data, info.input_name, info.logits_output, xs)
        assert edit.tensor == tensor and edit.max_logit_diff == 0.0, v.kind


def test_logits_only_model_with_fitted_detectors_packages_and_serves(digits_demo, stripped, tmp_path):
    """The features output fit-ood added by graph edit ships in the bundle, so the bundle that
    verifies also serves (it used to need a 'features' output the model did not have)."""
    from hardening.packaging import package_variant
    from hardening.report import run_full_audit
    from runtime_guard.bundle import generate_kek, generate_signing_keypair
    from runtime_guard.guard import GuardedModel

    res = run_full_audit(stripped, digits_demo.data_path, tmp_path / "review", kinds=("float",), areas=("ood",),
                         sizes={"ood_synthetic": 100}, allow_skipped=True)
    priv, pub = generate_signing_keypair()
    kek = generate_kek()
    out = package_variant(res.report_path, tmp_path / "m.ewb", signing_key=priv, kek=kek, version=1,
                          gate_action="flag")
    model = out.manifest["model"]
    assert model["features_added_by_graph_edit"] and model["packaged_sha256"] != model["sha256"]
    g = GuardedModel.load(tmp_path / "m.ewb", pub, kek, accept=False)
    assert g.features_name == "features"
    x = load_dataset(digits_demo.data_path).x[:8]
    r = g.predict(x, "client")  # the gate scores features from the shipped output
    want = make_session(stripped).run(None, {load_model(stripped).input_name: x})[0].argmax(1)
    assert r.decision in ("accepted", "flagged") and list(r.labels) == want.tolist(), r
