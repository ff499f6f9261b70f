"""Model admission: decide whether decrypted ONNX bytes are safe to hand to
onnxruntime, and open a locked-down CPU session from memory.

A signed model can still be dangerous if the publisher's pipeline was fooled,
so we refuse the ONNX features that reach outside the model bytes: external
data (file reads relative to the process), ``_ORT_MEM_ADDR_`` markers (raw
pointers into process memory), custom-op domains (native code we did not
vet), model-local functions, and opsets outside the tested range.

Where the ``_ORT_MEM_ADDR_`` scan looks (models under
``AdmissionLimits.strip_min_model_bytes`` are scanned whole; the rest of this
paragraph is about larger ones): onnxruntime gives the marker meaning in exactly
one place, the ``location`` string of a tensor's ``external_data``
(it then treats ``offset`` as a raw pointer). The scan covers every byte of the
model *except* the ``raw_data`` payload of large top-level initializers, i.e.
the weight-stripped skeleton the structural checks parse anyway: all names,
doc strings, attribute strings, string tensors, small initializers,
``external_data`` entries and subgraphs are in it. The bytes left out are the
contents of a ``bytes raw_data`` field, which onnxruntime only ever uses as
tensor data, never as a string; and a tensor that has such raw_data but also
``external_data``/``data_location=EXTERNAL`` is refused by the structural walk
regardless. Scanning the weights (about 13 ms for 51 MB) therefore adds no
protection. The skeleton is cut from the same wire-format parse that both
checks rely on (one ``graph`` field, no repeated ``raw_data``, no groups), so
what is not scanned is exactly what the walker saw as opaque weight bytes.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from .config import GuardConfigError
from .errors import ModelRejected

__all__ = ["AdmissionLimits", "Extension", "admit_model", "load_session", "load_session_streamed", "open_session",
           "session_options"]

ORT_MEM_ADDR_MARKER = b"_ORT_MEM_ADDR_"
MAX_THREADS = 64


@dataclass(frozen=True)
class AdmissionLimits:
    """Policy knobs. Defaults are deliberately tight for edge models."""

    max_model_bytes: int = 512 * 1024 * 1024
    max_nodes: int = 20_000  # summed over the main graph and all subgraphs
    max_subgraph_depth: int = 8
    allowed_domains: frozenset[str] = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
    # inclusive opset ranges per domain; "" and "ai.onnx" are the same domain
    opset_ranges: dict[str, tuple[int, int]] = field(default_factory=lambda: {
        "": (13, 23), "ai.onnx.ml": (1, 5), "com.microsoft": (1, 1)})
    ir_version_range: tuple[int, int] = (7, onnx.IR_VERSION)
    # Initializers at least this big are left out of the copy that
    # onnx.checker sees (declared as typed graph inputs instead), so the
    # checker + strict shape inference cost does not scale with weight bytes.
    # onnxruntime still validates every tensor's data size when it loads them.
    checker_strip_bytes: int = 64 * 1024
    # Models smaller than this are checked whole and reach onnxruntime as plain
    # bytes: there the Python wire walk and the skeleton-plus-OrtValues session
    # cost more than they save (benchmarks/results/cold_start.md: 0.3 ms of walk
    # for the int8 demo; in-place sessions slower up to ~4 MB, 2x faster from 16 MB).
    strip_min_model_bytes: int = 2 * 1024 * 1024
    # ConstantOfShape / Expand whose target shape is a constant in the graph: refused when
    # it asks for more elements than this (2**28 float32 = 1 GiB), before onnxruntime runs
    # anything. Shapes computed at run time are bounded by the smoke-run deadline instead.
    max_static_elements: int = 1 << 28


def _norm(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


class _Walker:
    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.nodes = 0

    def tensor(self, t: onnx.TensorProto, where: str) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0:
            raise ModelRejected(f"tensor {t.name!r} in {where} references external data",
                                check="external-data")

    def sparse(self, s: onnx.SparseTensorProto, where: str) -> None:
        self.tensor(s.values, where)
        self.tensor(s.indices, where)

    def graph(self, g: onnx.GraphProto, depth: int, outer: dict[str, list[int]] | None = None) -> None:
        if depth > self.limits.max_subgraph_depth:
            raise ModelRejected("subgraphs nested too deeply", check="subgraph-depth")
        where = f"graph {g.name!r}"
        names: set[str] = set()
        shapes = dict(outer or {})  # small constant int64 vectors visible here (shape operands)
        for t in g.initializer:
            self.tensor(t, where)
            if t.name in names:
                raise ModelRejected(f"duplicate initializer {t.name!r} in {where}",
                                    check="duplicate-initializer")
            names.add(t.name)
            _note_shape(shapes, t.name, t)
        for s in g.sparse_initializer:
            self.sparse(s, where)
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value" and a.HasField("t") and node.output:
                        _note_shape(shapes, node.output[0], a.t)
            operand = _SHAPE_OPERAND.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if operand is not None and len(node.input) > operand and node.input[operand] in shapes:
                dims = shapes[node.input[operand]]
                n = 1
                for d in dims:
                    n *= max(d, 0)
                if n > self.limits.max_static_elements:
                    raise ModelRejected(
                        f"{node.op_type} asks for a constant shape of {n} elements, over the "
                        f"{self.limits.max_static_elements} cap", check="static-size")
            self.nodes += 1
            if self.nodes > self.limits.max_nodes:
                raise ModelRejected(f"more than {self.limits.max_nodes} nodes", check="node-count")
            if node.domain not in self.limits.allowed_domains:
                raise ModelRejected(f"op {node.op_type!r} uses disallowed domain {node.domain!r}",
                                    check="op-domain")
            for a in node.attribute:
                at = f"attribute {a.name!r} of {node.op_type!r}"
                if a.HasField("t"):
                    self.tensor(a.t, at)
                for t in a.tensors:
                    self.tensor(t, at)
                if a.HasField("sparse_tensor"):
                    self.sparse(a.sparse_tensor, at)
                for s in a.sparse_tensors:
                    self.sparse(s, at)
                if a.HasField("g"):
                    self.graph(a.g, depth + 1, shapes)
                for sg in a.graphs:
                    self.graph(sg, depth + 1, shapes)


# op type -> index of the input that is a target shape
_SHAPE_OPERAND = {"ConstantOfShape": 0, "Expand": 1}


def _note_shape(shapes: dict[str, list[int]], name: str, t: onnx.TensorProto) -> None:
    """Remember ``name`` if ``t`` is a small int64 vector with its data inline."""
    if t.data_type != onnx.TensorProto.INT64 or len(t.dims) > 1 or t.data_location == onnx.TensorProto.EXTERNAL:
        return
    if t.dims and not 0 < t.dims[0] <= 16:
        return
    try:
        vals = numpy_helper.to_array(t).reshape(-1).tolist()
    except Exception:  # malformed tensor: the checker reports it
        return
    if len(vals) <= 16:
        shapes[name] = [int(v) for v in vals]


def _check_opsets(model: onnx.ModelProto, limits: AdmissionLimits) -> None:
    seen: dict[str, int] = {}
    for imp in model.opset_import:
        dom = _norm(imp.domain)
        if imp.domain not in limits.allowed_domains:
            raise ModelRejected(f"opset import of disallowed domain {imp.domain!r}", check="op-domain")
        if dom in seen:
            raise ModelRejected(f"duplicate opset import for domain {imp.domain!r}", check="opset")
        seen[dom] = imp.version
        lo, hi = limits.opset_ranges.get(dom, (1, 0))
        if not lo <= imp.version <= hi:
            raise ModelRejected(f"opset {imp.version} for domain {imp.domain!r} outside {lo}..{hi}",
                                check="opset")
    if "" not in seen:
        raise ModelRejected("model does not import the default ONNX opset", check="opset")


def _nominal_bytes(t: onnx.TensorProto) -> int:
    """Size implied by dims and dtype, or -1 if it has no fixed-width encoding."""
    if t.data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return -1
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return -1
    n = 1
    for d in t.dims:
        if d < 0:
            return -1
        n *= d
    if t.data_type in _SUB_BYTE_TYPES:  # 4-bit / 2-bit types pack several per byte
        return -1
    return n * itemsize


_SUB_BYTE_TYPES = frozenset(
    getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, n))


# --- weight stripping on the protobuf wire format -----------------------------
# Parsing a 50 MB model in Python copies every weight byte just so we can look
# at a few KB of graph structure. Instead we copy the serialized model minus
# the raw_data of large top-level initializers, byte-for-byte otherwise, and
# parse that. Only TensorProto.raw_data (field 9) of ModelProto.graph (7)
# .initializer (5) entries is ever removed; anything unusual is refused.

_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ModelRejected("malformed protobuf varint", check="parse")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (field, wire_type, field_start, value_start, field_end)."""
    while pos < end:
        start = pos
        tag, pos = _varint(buf, pos, end)
        field, wt = tag >> 3, tag & 7
        if wt == 0:
            _, pos = _varint(buf, pos, end)
            vstart = pos
        elif wt == 1:
            vstart, pos = pos, pos + 8
        elif wt == 5:
            vstart, pos = pos, pos + 4
        elif wt == 2:
            n, vstart = _varint(buf, pos, end)
            pos = vstart + n
        else:  # groups (3/4) and invalid types: never emitted for ONNX
            raise ModelRejected(f"unsupported protobuf wire type {wt}", check="parse")
        if pos > end or field == 0:
            raise ModelRejected("malformed protobuf field", check="parse")
        yield field, wt, start, vstart, pos


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(len(payload)) + payload


def _strip_weights(buf: bytes, threshold: int) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """(model bytes without large initializer raw_data,
    {initializer index: (offset of its raw_data bytes in ``buf``, their length)})."""
    out, stripped, graphs = [], {}, 0
    for fnum, wt, start, vstart, end in _fields(buf, 0, len(buf)):
        if fnum != _MODEL_GRAPH or wt != 2:
            out.append(buf[start:end])
            continue
        graphs += 1
        if graphs > 1:
            raise ModelRejected("model has more than one graph field", check="parse")
        gparts, index = [], 0
        for gf, gwt, gs, gv, ge in _fields(buf, vstart, end):
            if gf != _GRAPH_INITIALIZER or gwt != 2:
                gparts.append(buf[gs:ge])
                continue
            raws = [(s, v, e) for f, w, s, v, e in _fields(buf, gv, ge) if f == _TENSOR_RAW_DATA]
            if len(raws) > 1:
                raise ModelRejected("initializer repeats raw_data", check="parse")
            if raws and raws[0][2] - raws[0][1] >= threshold:
                rs, rv, re_ = raws[0]
                stripped[index] = (rv, re_ - rv)
                gparts.append(_len_field(_GRAPH_INITIALIZER, buf[gv:rs] + buf[re_:ge]))
            else:
                gparts.append(buf[gs:ge])
            index += 1
        out.append(_len_field(_MODEL_GRAPH, b"".join(gparts)))
    return (buf if not stripped else b"".join(out)), stripped


def _check_sizes(model: onnx.ModelProto, stripped: dict[int, tuple[int, int]]) -> None:
    """Top-level initializers' raw bytes must be exactly what their dims/dtype
    imply (onnx.checker does not compare them), and stripped ones may have no
    second data field (the checker never sees those tensors)."""
    for index, t in enumerate(model.graph.initializer):
        if index in stripped:
            others = [f.name for f, _ in t.ListFields() if f.name.endswith("_data")]
            bad = bool(others) or _nominal_bytes(t) != stripped[index][1]
        else:
            bad = t.HasField("raw_data") and _nominal_bytes(t) not in (-1, len(t.raw_data))
        if bad:
            raise ModelRejected(f"initializer {t.name!r} data does not match its shape/type",
                                check="tensor-data")


def _skeleton(model_bytes: bytes, limits: AdmissionLimits) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """What the checks look at: the weight-stripped bytes and what was cut, or
    the bytes themselves (nothing cut) under ``limits.strip_min_model_bytes``."""
    if len(model_bytes) >= limits.strip_min_model_bytes:
        return _strip_weights(model_bytes, limits.checker_strip_bytes)
    return model_bytes, {}


def _checker_view(skeleton: bytes, model: onnx.ModelProto,
                  stripped: dict[int, tuple[int, int]]) -> onnx.ModelProto | bytes:
    """What onnx.checker gets: unstripped, the bytes themselves (a proto would be
    re-serialised); stripped, the parsed ``model`` with stripped initializers
    declared as typed graph inputs, so onnx.checker (full_check: strict shape
    inference with constant propagation through the small, shape-like
    initializers that are kept) sees a valid model whose size does not scale
    with the weights."""
    if not stripped:
        return skeleton
    view = onnx.ModelProto()
    view.CopyFrom(model)  # cheap: large raw_data is already gone
    g = view.graph
    declared = {i.name for i in g.input}
    moved = [g.initializer[i] for i in sorted(stripped)]
    for t in moved:
        if t.name not in declared:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    keep = [t for i, t in enumerate(g.initializer) if i not in stripped]
    del g.initializer[:]
    g.initializer.extend(keep)
    return view


def _parse(data: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # protobuf's DecodeError; protobuf itself is not a declared dependency
        raise ModelRejected("bytes are not a parseable ONNX model", check="parse") from None
    return model


@dataclass(frozen=True)
class _Admitted:
    model_bytes: bytes
    skeleton: onnx.ModelProto  # large initializers without their raw_data
    stripped: dict[int, tuple[int, int]]  # initializer index -> (offset in model_bytes, length)


def admit_model(model_bytes: bytes, limits: AdmissionLimits | None = None, *,
                full_proto: bool = True) -> onnx.ModelProto:
    """Run every admission check; return the parsed model or raise ModelRejected.

    Cheap byte-level checks run first, then structural walks, and
    onnx.checker (full_check) last. For models of at least
    ``limits.strip_min_model_bytes`` checks run on a weight-stripped copy, so
    their cost does not grow with weight size; with ``full_proto=False`` that
    copy is returned (large initializers have no data) and the full parse is
    skipped.
    """
    admitted = _admit(model_bytes, limits or AdmissionLimits())
    if full_proto and admitted.stripped:
        return _parse(admitted.model_bytes)
    return admitted.skeleton


def _admit(model_bytes: bytes, limits: AdmissionLimits) -> _Admitted:
    if not isinstance(model_bytes, (bytes, bytearray)):
        raise ModelRejected("model must be bytes", check="type")
    model_bytes = bytes(model_bytes)
    if len(model_bytes) > limits.max_model_bytes:
        raise ModelRejected(f"model is {len(model_bytes)} bytes, over the {limits.max_model_bytes} cap",
                            check="size")
    skeleton, stripped = _skeleton(model_bytes, limits)
    # Every byte except the raw_data of large top-level initializers (see the
    # module docstring for why the weight bytes need no scan).
    if ORT_MEM_ADDR_MARKER in skeleton:
        raise ModelRejected("model contains an _ORT_MEM_ADDR_ marker", check="ort-mem-addr")
    model = _parse(skeleton)
    if not model.HasField("graph"):
        raise ModelRejected("model has no graph", check="parse")
    lo, hi = limits.ir_version_range
    if not lo <= model.ir_version <= hi:
        raise ModelRejected(f"IR version {model.ir_version} outside {lo}..{hi}", check="ir-version")
    if len(model.functions):
        raise ModelRejected("model-local functions are not allowed", check="functions")
    if len(model.training_info):
        raise ModelRejected("training_info is not allowed", check="training-info")
    _check_opsets(model, limits)
    _Walker(limits).graph(model.graph, 0)
    _check_sizes(model, stripped)
    try:
        onnx.checker.check_model(_checker_view(skeleton, model, stripped), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, ...
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelRejected(f"onnx.checker failed: {type(exc).__name__}: {msg}",
                            check="checker") from None
    return _Admitted(model_bytes, model, stripped)


def session_options(intra_op_threads: int = 1, inter_op_threads: int = 1) -> ort.SessionOptions:
    """SessionOptions that write nothing to disk and load nothing extra."""
    for n in (intra_op_threads, inter_op_threads):
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_THREADS:
            raise GuardConfigError("threads", f"thread counts must be integers in 1..{MAX_THREADS}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_profiling = False
    so.optimized_model_filepath = ""  # never dump the (decrypted) optimized model
    so.log_severity_level = 3
    so.add_session_config_entry("session.load_model_format", "ONNX")
    so.add_session_config_entry("session.use_env_allocators", "0")
    so.add_session_config_entry("session.allow_released_opsets_only", "1")
    # No register_custom_ops_library(): custom-op shared objects are never loaded.
    return so


def open_session(model_bytes: bytes, intra_op_threads: int = 1,
                 inter_op_threads: int = 1) -> ort.InferenceSession:
    """CPU-only InferenceSession from in-memory bytes. Call admit_model first."""
    return _session(bytes(model_bytes), session_options(intra_op_threads, inter_op_threads))


def _session(data: bytes | str, so: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelRejected(f"onnxruntime refused the model: {type(exc).__name__}",
                            check="session") from None


# Little-endian numpy dtypes for the ONNX element types a stripped weight may have; others
# (bfloat16, float8, int4, strings, complex) make load_session hand over the whole bytes.
_LE_DTYPES = {
    onnx.TensorProto.FLOAT: "<f4", onnx.TensorProto.DOUBLE: "<f8", onnx.TensorProto.FLOAT16: "<f2",
    onnx.TensorProto.INT8: "i1", onnx.TensorProto.UINT8: "u1", onnx.TensorProto.INT16: "<i2",
    onnx.TensorProto.UINT16: "<u2", onnx.TensorProto.INT32: "<i4", onnx.TensorProto.UINT32: "<u4",
    onnx.TensorProto.INT64: "<i8", onnx.TensorProto.UINT64: "<u8", onnx.TensorProto.BOOL: "?",
}


def _weights_in_place(admitted: _Admitted) -> tuple[bytes, list[str], list[ort.OrtValue]] | None:
    """(skeleton bytes, names, OrtValues viewing the weights inside ``model_bytes``), or
    None when the model has no stripped weights or one of a type we do not map.

    The views are never copied, aligned or not: onnxruntime copies every external
    initializer into its own graph while the session loads (``AddExternalInitializers``:
    "the user provided buffers can then be deallocated"), a byte copy that does not care
    where protobuf put the raw_data. The skeleton marks each such initializer as
    external data with an *empty* location: onnxruntime takes the supplied value for it
    and refuses an empty location outright, so no name can ever fall back to reading a file.
    """
    if not admitted.stripped or sys.byteorder != "little":
        return None
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(admitted.skeleton)  # small: the large raw_data is not in it
    inits = skeleton.graph.initializer
    names: list[str] = []
    values: list[ort.OrtValue] = []
    for index, (offset, length) in sorted(admitted.stripped.items()):
        t = inits[index]
        code = _LE_DTYPES.get(t.data_type)
        if code is None:
            return None
        dtype = np.dtype(code)
        arr = np.frombuffer(admitted.model_bytes, dtype=dtype, count=length // dtype.itemsize,
                            offset=offset).reshape(tuple(t.dims))
        names.append(t.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(arr))
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        t.external_data.add(key="location", value="")
    return skeleton.SerializeToString(), names, values


Extension = Callable[[onnx.ModelProto], bytes]
"""Given the admitted model (large weights without data), the serialized ``ModelProto`` part
to append to it: protobuf parses concatenated messages as one, so its nodes, initializers
and outputs join the model's graph (``anomaly.AnomalyScorer.extension``: the gate)."""


def load_session(model_bytes: bytes, limits: AdmissionLimits | None = None, intra_op_threads: int = 1,
                 inter_op_threads: int = 1, extend: Extension | None = None) -> ort.InferenceSession:
    """Admission checks, then a locked-down CPU session: the one way the runtime loads a model.

    Large weights are not parsed out of the protobuf a second time: onnxruntime gets the
    small skeleton plus OrtValues that view the weight bytes inside ``model_bytes`` (the
    decrypted payload) and copies them once into memory it owns. Nothing here keeps
    ``model_bytes`` alive afterwards, so a caller that drops its last reference frees the
    plaintext as soon as the session exists (``GuardedModel.load`` does): peak memory is
    the plaintext plus onnxruntime's copy, steady state onnxruntime's copy alone
    (benchmarks/bench_bundle_memory.py). Models under ``limits.strip_min_model_bytes`` go
    to onnxruntime as plain bytes, which is faster at that size. ``extend`` adds a part to the
    admitted model (``Extension``), after every admission check.
    """
    admitted = _admit(model_bytes, limits or AdmissionLimits())
    extra = b"" if extend is None else extend(admitted.skeleton)
    in_place = _weights_in_place(admitted)
    if in_place is None:
        return open_session(admitted.model_bytes + extra, intra_op_threads, inter_op_threads)
    skeleton, names, values = in_place
    so = session_options(intra_op_threads, inter_op_threads)
    so.add_external_initializers(names, values)
    return _session(skeleton + extra, so)


_FD_DIR = "/proc/self/fd"


def load_session_streamed(take_model: Callable[[], bytes],
                          stream_model: Callable[[Callable[[memoryview], object]], None],
                          limits: AdmissionLimits | None = None, intra_op_threads: int = 1,
                          inter_op_threads: int = 1, extend: Extension | None = None) -> ort.InferenceSession:
    """Like ``load_session``, but the plaintext is freed before onnxruntime reads the model.

    ``take_model()`` hands over the only reference to the decrypted bytes; they are admitted
    and dropped. onnxruntime then parses the model from a pipe (``/proc/self/fd/N``: no file,
    nothing on disk) that a thread fills with ``stream_model(write)``, which decrypts the
    payload again batch by batch and writes a batch only if it is byte-for-byte what was
    admitted (``OpenedBundle.stream_model``). Peak memory is thus the larger of the plaintext
    and onnxruntime's own load of the model, not their sum (benchmarks/bench_bundle_memory.py).
    A failure of the stream (tampering in between) is raised instead of any session built from
    it. Small models (under ``limits.strip_min_model_bytes``), and systems without
    ``/proc/self/fd``, load from memory as ``load_session`` does. ``extend``'s part is
    streamed after the model.
    """
    limits = limits or AdmissionLimits()
    model = take_model()
    if len(model) < limits.strip_min_model_bytes or not os.path.isdir(_FD_DIR):
        return load_session(model, limits, intra_op_threads, inter_op_threads, extend)
    admitted = _admit(model, limits)  # raises ModelRejected
    extra = b"" if extend is None else extend(admitted.skeleton)
    del model, admitted
    so = session_options(intra_op_threads, inter_op_threads)
    failed: list[BaseException] = []
    r, w = os.pipe()

    def feed() -> None:
        def write(piece: memoryview) -> None:
            while piece:
                piece = piece[os.write(w, piece):]
        try:
            stream_model(write)
            write(memoryview(extra))
        except BrokenPipeError:  # onnxruntime stopped reading: its own error is raised
            pass
        except BaseException as exc:  # surfaced below, on the loading thread
            failed.append(exc.with_traceback(None))
        finally:
            os.close(w)

    feeder = threading.Thread(target=feed, name="model-stream", daemon=True)
    feeder.start()
    try:
        sess = _session(f"{_FD_DIR}/{r}", so)
    except ModelRejected:
        os.close(r)
        r = -1
        feeder.join()
        if failed:
            raise failed[0] from None
        raise
    finally:
        if r >= 0:
            os.close(r)
        feeder.join()
    if failed:  # the stream broke after onnxruntime had a complete-looking model: never use it
        del sess
        raise failed[0] from None
    return sess
