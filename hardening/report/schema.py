"""The report's identity and validation: versioned JSON, checked against report.schema.json.

Versioning: ``MAJOR.MINOR``. Minor versions only add optional fields, so readers
accept any minor of their major; a different major is refused (exit 2) instead
of being compared field by field and giving a wrong answer.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from hardening.errors import InputError

SCHEMA_NAME = "edgeward.report"
SCHEMA_VERSION = "1.4"
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")


class ReportError(InputError):
    """A report file is unreadable, schema-invalid or of another major version (exit 2)."""


@lru_cache(maxsize=1)
def json_schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def major(version: str) -> int:
    return int(str(version).split(".")[0])


def validate_report(doc: object, source: str = "report") -> dict:
    """Raise ``ReportError`` naming the first schema violation; return the doc."""
    import jsonschema

    if not isinstance(doc, dict):
        raise ReportError(f"{source}: not a JSON object")
    if doc.get("schema") != SCHEMA_NAME:
        raise ReportError(f"{source}: not an edgeward report (schema = {doc.get('schema')!r})")
    ver = doc.get("schema_version")
    try:
        if major(ver) != major(SCHEMA_VERSION):  # type: ignore[arg-type]
            raise ReportError(f"{source}: schema version {ver} is not readable by this edgeward (reads {major(SCHEMA_VERSION)}.x)")
    except (TypeError, ValueError):
        raise ReportError(f"{source}: bad schema_version {ver!r}") from None
    validator = jsonschema.Draft202012Validator(json_schema())
    err = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ReportError(f"{source}: schema-invalid report at {where}: {err.message}")
    return doc


def load_report(path: str | Path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes())
    except OSError as e:
        raise ReportError(f"{path}: cannot read report ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    return validate_report(doc, str(path))
