"""Finished shards on disk: ``<dir>/shards/<id>.json`` + ``<id>.npz``, written atomically.

Plain JSON and ``.npz`` read with ``allow_pickle=False``: a checkpoint folder may come
from anywhere, so loading one never executes code. The shard id is a digest of the
shard's full input (settings, seeds, arrays), so a changed setting never reuses a stale
result: it simply has another id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from hardening.errors import InputError

FORMAT = "edgeward.shard/1"


class ShardStore:
    def __init__(self, root: str | Path) -> None:
        self.dir = Path(root) / "shards"

    def _paths(self, shard_id: str) -> tuple[Path, Path]:
        return self.dir / f"{shard_id}.json", self.dir / f"{shard_id}.npz"

    def has(self, shard_id: str) -> bool:
        j, a = self._paths(shard_id)
        return j.is_file() and a.is_file()

    def save(self, shard_id: str, meta: dict, arrays: dict[str, np.ndarray], where: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        j, a = self._paths(shard_id)
        tmp_a = a.with_name(a.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp_a, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp_a, a)  # the arrays first: a .json without its .npz is never taken as done
        tmp_j = j.with_name(j.name + f".{os.getpid()}.tmp")
        tmp_j.write_text(json.dumps({"format": FORMAT, "id": shard_id, "meta": meta, "where": where},
                                    allow_nan=True))
        os.replace(tmp_j, j)

    def load(self, shard_id: str) -> tuple[dict, dict[str, np.ndarray], dict]:
        j, a = self._paths(shard_id)
        try:
            doc = json.loads(j.read_text())
            if doc.get("format") != FORMAT or doc.get("id") != shard_id:
                raise ValueError("not a shard checkpoint of this format")
            with np.load(a, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{j}: unreadable shard checkpoint ({e}); delete it or run without --resume") from None
        return doc["meta"], arrays, doc.get("where", {})

    def finished(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json") if self.has(p.stem))
