"""Where stored paths point: one rule for every file edgeward writes (variants.json, reports).

A path inside the folder of the file that records it is stored relative to that folder,
so the folder can be moved or consumed from any working directory; anything outside it
is stored absolute. Reading resolves relative paths against the recording file's folder,
never against the current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def portable(path: str | Path, base: str | Path) -> str:
    """``path`` as it should be stored in a file that lives in folder ``base``."""
    p = Path(path).resolve()
    b = Path(base).resolve()
    try:
        return p.relative_to(b).as_posix()
    except ValueError:
        return str(p)


def resolve(stored: str | Path, base: str | Path) -> Path:
    """The file a stored path names, for a recording file in folder ``base``."""
    p = Path(os.path.expanduser(str(stored)))
    return p if p.is_absolute() else Path(base) / p
