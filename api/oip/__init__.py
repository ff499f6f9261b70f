"""KServe Open Inference Protocol v2, transport-neutral.

``tensors`` decodes and encodes OIP tensors (JSON ``data`` and the binary
tensor data extension: little-endian, row-major); ``infer`` runs one OIP
inference request through the shared service layer (auth, guard, rate
limits, metrics) and returns typed output tensors; ``stats`` keeps the
per-model statistics ``/v2/models/<name>/stats`` reports. The HTTP routes
(``api.routes.v2``) and the gRPC servicer (``api.grpc_server``) are thin
adapters over these, so both transports answer the same way.
"""
