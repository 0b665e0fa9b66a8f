"""Loads the JSON Schema files once and checks reports against them."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

ENVELOPE_SCHEMA = "report.schema.json"


def schema_dir() -> Path:
    """The schemas shipped in the wheel, or the repository's schemas/ in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "schemas", here.parent / "schemas"):
        if (candidate / ENVELOPE_SCHEMA).is_file():
            return candidate
    raise FileNotFoundError(f"no {ENVELOPE_SCHEMA} beside {here}")


def load_schemas(directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every schema file: ``report.schema.json`` plus ``<type>.schema.json`` per report type."""
    folder = directory or schema_dir()
    return {
        path.name: orjson.loads(path.read_bytes()) for path in sorted(folder.glob("*.schema.json"))
    }


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why one report was refused: a stable code, the offending field, a readable message."""

    code: str
    field: str
    message: str


class ReportValidator:
    """Checks the envelope of every report, and the body of report types that have a schema."""

    def __init__(self, schemas: Mapping[str, dict[str, Any]]) -> None:
        # jsonschema-rs compiles the same files: ~1 us per report, against ~60 us interpreted.
        self._envelope = jsonschema_rs.validator_for(schemas[ENVELOPE_SCHEMA])
        self._bodies = {
            name.removesuffix(".schema.json"): jsonschema_rs.validator_for(schema)
            for name, schema in schemas.items()
            if name != ENVELOPE_SCHEMA
        }

    def check(self, report: Any) -> Invalid | None:
        """None when the report is valid, else the first reason it is not."""
        if not isinstance(report, dict):
            return Invalid("not_an_object", "", "each report must be a JSON object")
        if not self._envelope.is_valid(report):
            return _first_error(self._envelope, report, "")
        body_validator = self._bodies.get(report["type"])
        if body_validator is not None and not body_validator.is_valid(report["body"]):
            return _first_error(body_validator, report["body"], "body")
        return None


# jsonschema-rs quotes the offending value in its message, and a value can be a 1 MiB object:
# the message goes back in the answer and into quarantine, so it is cut.
MAX_MESSAGE = 300


def _first_error(validator: Any, instance: Any, prefix: str) -> Invalid:
    error = next(iter(validator.iter_errors(instance)))
    path = [prefix] if prefix else []
    path.extend(str(part) for part in error.instance_path)
    message = error.message
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "\u2026"
    if error.kind.__class__.__name__.endswith("Required"):
        missing = getattr(error.kind, "property", None)
        name = str(missing) if missing is not None else ""
        path.append(name.strip("\"'"))
        return Invalid("missing_field", ".".join(path), message)
    return Invalid("invalid_field", ".".join(path), message)


@functools.cache
def default_validator() -> ReportValidator:
    return ReportValidator(load_schemas())
