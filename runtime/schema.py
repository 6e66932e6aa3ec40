"""A small JSON Schema validator for the files the runtime reads (manifest.json, ...).

The schemas are data (JSON Schema, draft 2020-12), published as files beside the module that
owns each one, and this checks a document against one with errors that name the key path
(`limits.max_seq_len: expected an integer, got 'lots'`). It implements the keywords those
schemas use, with JSON Schema's meaning (tests/runtime/test_manifest_schema.py checks it
against the `jsonschema` package on valid and invalid documents): type, enum, const,
properties, required, additionalProperties, items, minItems, maxItems, minimum, maximum,
exclusiveMinimum, minLength, pattern, $ref to "#/$defs/...". Anything else in a schema is an
error, so a schema cannot silently ask for a check this does not do. No dependency beyond the
standard library: the base install stays numpy + onnxruntime + tokenizers + Pillow + click.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

KEYWORDS = frozenset(
    {
        "$schema", "$id", "$defs", "$ref", "title", "description", "type", "enum", "const",
        "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
        "minimum", "maximum", "exclusiveMinimum", "minLength", "pattern",
    }
)  # fmt: skip


class SchemaViolation(ValueError):
    """`path`: where in the document (dotted keys, [i] for items); `message`: what is wrong."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path or '(top level)'}: {message}")
        self.path = path
        self.message = message


# Python type of a parsed JSON value -> its JSON Schema type (bool before int: a subclass)
_JSON_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"),
               (str, "string"), (list, "array"), (dict, "object"))  # fmt: skip


def _type_name(value: Any) -> str:
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)),
                type(value).__name__)  # fmt: skip


def _is(value: Any, kind: str) -> bool:
    actual = _type_name(value)
    if kind == "number":
        return actual in ("integer", "number")
    if kind == "integer":  # JSON Schema: any number with a zero fractional part
        return actual == "integer" or (
            actual == "number" and math.isfinite(value) and float(value).is_integer()
        )
    return actual == kind


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_ARTICLE = {"integer": "an integer", "array": "an array", "object": "an object"}


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def validate(document: Any, schema: dict[str, Any]) -> Any:
    """Check `document` against `schema`; return it with integral floats where the schema says
    integer made ints (JSON's `2.0` read as 2). Raises SchemaViolation at the first error."""
    return _check(document, schema, schema, "")


def _check(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str) -> Any:
    unknown = set(schema) - KEYWORDS
    if unknown:
        raise ValueError(f"schema at {path or 'top level'} uses unsupported keywords {unknown}")
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref!r}")
        return _check(value, root["$defs"][ref[len("#/$defs/") :]], root, path)
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is(value, k) for k in kinds):
            want = " or ".join(_ARTICLE.get(k, f"a {k}") for k in kinds)
            raise SchemaViolation(path, f"expected {want}, got {_show(value)}")
        if "integer" in kinds and isinstance(value, float) and float(value).is_integer():
            value = int(value)
    if "const" in schema and value != schema["const"]:
        raise SchemaViolation(path, f"expected {schema['const']!r}, got {_show(value)}")
    if "enum" in schema and not any(
        value == e and _type_name(value) == _type_name(e) for e in schema["enum"]
    ):
        raise SchemaViolation(path, f"expected one of {schema['enum']}, got {_show(value)}")
    if _is(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaViolation(path, f"must be >= {schema['minimum']}, got {value}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            raise SchemaViolation(path, f"must be > {schema['exclusiveMinimum']}, got {value}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaViolation(path, f"must be <= {schema['maximum']}, got {value}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise SchemaViolation(path, f"must have at least {schema['minLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise SchemaViolation(
                path, f"{_show(value)} does not match the pattern {schema['pattern']!r}"
            )
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise SchemaViolation(path, f"must have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise SchemaViolation(path, f"must have at most {schema['maxItems']} items")
        if "items" in schema:
            value = [_check(v, schema["items"], root, _join(path, i)) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                raise SchemaViolation(path, f"missing required key {key!r}")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        checked = {}
        for key, item in value.items():
            if key in properties:
                checked[key] = _check(item, properties[key], root, _join(path, key))
            elif extra is False:
                known = ", ".join(sorted(properties))
                raise SchemaViolation(path, f"unknown key {key!r} (known: {known})")
            elif isinstance(extra, dict):
                checked[key] = _check(item, extra, root, _join(path, key))
            else:
                checked[key] = item
        value = checked
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def load_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """The JSON document in the file at `path`, strictly: UTF-8, no NaN/Infinity literals.
    Every failure (missing, a folder, unreadable, not UTF-8, invalid JSON) is `error` with a
    message that starts with the path."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from e
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError included
        raise error(f"{path}: invalid JSON ({e})") from e


def check_document(
    document: Any, schema: dict[str, Any], where: str, error: type[Exception] = ValueError
) -> Any:
    """`validate` with the violation raised as `error` naming `where` (the file) and the key."""
    try:
        return validate(document, schema)
    except SchemaViolation as e:
        raise error(f"{where}: {e}") from None
