"""Model intake: load any ONNX classifier, check it is safe and fits the data.

We accept one float input of any name (NCHW images or flat vectors, dynamic
or fixed batch) and, as outputs, logits ``[N, C]`` first and optionally
penultimate features ``[N, D]`` (named ``features`` or second output).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from attacks.outputs import OutputConvention
from hardening.data import Dataset
from hardening.errors import DataError, ModelError

MAX_MODEL_BYTES = 512 * 1024 * 1024
_FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32"}


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the pipeline needs to know about a model."""

    path: str
    sha256: str
    size_bytes: int
    input_name: str
    input_shape: tuple[int | None, ...]  # None = dynamic (batch is always index 0)
    layout: str  # "nchw", "flat" or "other"
    logits_output: str
    features_output: str | None
    num_classes: int | None
    opset: int
    output_convention: OutputConvention  # a final Softmax or Sigmoid makes the output probabilities

    def to_dict(self) -> dict:
        return asdict(self)


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)


def _iter_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensors(attr.g)
            for g in attr.graphs:
                yield from _iter_tensors(g)


def _refuse_external_data(model: onnx.ModelProto, path: Path) -> None:
    for t in _iter_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            loc = next((e.value for e in t.external_data if e.key == "location"), "?")
            target = (path.parent / loc).resolve()
            where = "outside the model folder" if path.parent.resolve() not in target.parents else "beside the model"
            raise ModelError(
                f"{path}: tensor '{t.name}' uses external data file '{loc}' ({where}); "
                "external data is refused, embed weights in the .onnx file"
            )


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model(path: str | Path, max_bytes: int = MAX_MODEL_BYTES) -> ModelInfo:
    """Validate an ONNX classifier and describe it; raises ``ModelError`` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelError(f"{path}: model is {size} bytes, above the {max_bytes}-byte limit")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: not a valid ONNX model ({type(e).__name__})") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not a valid ONNX model (empty graph)")
    _refuse_external_data(model, path)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise ModelError(f"{path}: ONNX checker failed: {first}") from None

    init_names = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected exactly one input, found {len(inputs)}")
    inp = inputs[0]
    if inp.type.tensor_type.elem_type not in _FLOAT_TYPES:
        raise ModelError(f"{path}: input '{inp.name}' must be float32")
    shape = _dims(inp)
    layout = "flat" if len(shape) == 2 else "nchw" if len(shape) == 4 else "other"

    outs = list(model.graph.output)
    feats = next((o for o in outs if o.name == "features"), outs[1] if len(outs) > 1 else None)
    logits = next(o for o in outs if o is not feats)
    lshape = _dims(logits)
    if len(lshape) != 2:
        raise ModelError(f"{path}: output '{logits.name}' must be [batch, classes], got rank {len(lshape)}")
    if feats is not None and len(_dims(feats)) != 2:
        raise ModelError(f"{path}: feature output '{feats.name}' must be [batch, dim]")
    producer = {o: n for n in model.graph.node for o in n.output}.get(logits.name)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelInfo(
        path=str(path),
        sha256=sha256_file(path),
        size_bytes=size,
        input_name=inp.name,
        input_shape=shape,
        layout=layout,
        logits_output=logits.name,
        features_output=feats.name if feats is not None else None,
        num_classes=lshape[1],
        opset=opset,
        output_convention=OutputConvention.of_final_op(producer.op_type if producer is not None else None),
    )


def check_fits(info: ModelInfo, ds: Dataset) -> None:
    """Refuse data whose sample shape or labels do not fit the model."""
    want = info.input_shape[1:]
    got = ds.sample_shape
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
        shown = tuple("?" if w is None else w for w in want)
        raise DataError(f"{ds.source}: samples have shape {got}, model '{info.input_name}' expects {shown}")
    if info.num_classes is not None:
        top = max(int(a.max()) for a in (ds.y, ds.y_cal, ds.y_train) if a is not None and a.size)
        if top >= info.num_classes:
            raise DataError(f"{ds.source}: label {top} is out of range for a {info.num_classes}-class model")


def make_session(model: str | Path | bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with a fixed thread count so measurements are comparable."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def predict_logits(sess: ort.InferenceSession, info: ModelInfo, x: np.ndarray, batch: int = 256) -> np.ndarray:
    outs = [sess.run([info.logits_output], {info.input_name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs, axis=0)
