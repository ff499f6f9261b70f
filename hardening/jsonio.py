"""JSON encoding of reports and CLI output: numpy scalars and arrays, paths, ``to_dict`` objects.

Below the CLI so the report orchestration and the commands share one encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def dumps(data: Any) -> str:
    """Indented JSON; NaN and infinity are refused (``allow_nan=False``)."""
    return json.dumps(data, indent=2, default=_default, allow_nan=False)
