"""Two full-review report.json files, compared modulo timings and runtime measurements.

    .venv/bin/python benchmarks/compare_reviews.py A/report.json B/report.json

Prints, per field path (list indices dropped), how many values differ; each report's own
folder is normalised to OUT. Skipped as measurements: wall times, profiling latency and
memory, where shards ran, the command line, schema version and provenance. Used to show
that splitting the audit into runners kept the report: compare two runs of main with
each other, then main with the branch; the same fields must differ (HopSkipJump's query
counts and distances are not repeatable run to run) and nothing else.
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

MEASURED = {"seconds", "timings", "created_at", "shards_wall_s", "pid", "host", "session_create_ms", "cold_start_ms",
            "latency", "memory_added_mb", "memory_by_batch", "cpu_ms_per_inference", "energy_uj_per_inference",
            "latency_p95_ms", "memory_mb", "command", "execution", "schema_version", "provenance"}


def load(path: str) -> dict:
    out = str(Path(path).resolve().parent)
    return json.loads(Path(path).read_text().replace(out + "/", "OUT/").replace(out, "OUT"))


def differences(a: dict, b: dict) -> tuple[collections.Counter, list[str]]:
    diffs: collections.Counter = collections.Counter()
    one_sided: list[str] = []

    def cmp(x, y, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in dict.fromkeys([*x, *y]):
                if k in MEASURED:
                    continue
                if k not in x or k not in y:
                    one_sided.append(f"{path}/{k}")
                    continue
                cmp(x[k], y[k], f"{path}/{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for u, v in zip(x, y):
                cmp(u, v, path + "[]")
        elif x != y:
            diffs[re.sub(r"\[\]", "", path)] += 1

    cmp(a, b, "")
    return diffs, one_sided


def main() -> None:
    a, b = load(sys.argv[1]), load(sys.argv[2])
    diffs, one_sided = differences(a, b)
    for k, n in sorted(diffs.items()):
        print(f"{n:5d}  {k}")
    changed = sorted({x["metric"] for x, y in zip(a["checks"], b["checks"]) if x != y})
    status = [(x["id"], x["status"], y["status"]) for x, y in zip(a["checks"], b["checks"]) if x["status"] != y["status"]]
    print(f"checks whose value differs: {changed or 'none'}; status changes: {status or 'none'}")
    print(f"fields in only one report: {one_sided or 'none'}")


if __name__ == "__main__":
    main()
