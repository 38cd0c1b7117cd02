"""Checks a JSON value against edge.schema, failing with OpenAI's own messages and codes.

It understands the subset of JSON Schema the schemas use: type (one or a list), enum,
minimum/maximum, minItems/maxItems, items, properties, required, additionalProperties.
Runs once per request, never per token.
"""

from __future__ import annotations

from typing import Any

from edge.errors import ApiError, bad_request
from edge.schema import NEUTRAL_VALUES, Schema

_TYPE_NAMES = {
    "string": "a string", "integer": "an integer", "number": "a decimal", "boolean": "a boolean",
    "object": "an object", "array": "an array", "null": "null",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _matches(value_type: str, allowed: list[str]) -> bool:
    return value_type in allowed or (value_type == "integer" and "number" in allowed)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def validate(schema: Schema, value: Any, path: str = "") -> None:
    """Raises ApiError(400) naming the first field of value that the schema refuses."""
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        got = _json_type(value)
        if not _matches(got, allowed):
            expected = " or ".join(_TYPE_NAMES[t] for t in allowed if t != "null")
            raise bad_request(
                f"Invalid type for '{path}': expected {expected}, but got {_TYPE_NAMES[got]} instead.",
                param=path, code="invalid_type",
            )
    if value is None:
        return
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(repr(v) for v in schema["enum"] if v is not None)
        raise bad_request(f"Invalid value: {value!r}. Supported values are: {supported}.", param=path, code="invalid_value")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_bounds(schema, value, path)
    if isinstance(value, list):
        _check_array(schema, value, path)
    if isinstance(value, dict) and ("properties" in schema or "additionalProperties" in schema):
        _check_object(schema, value, path)


def _check_bounds(schema: Schema, value: float, path: str) -> None:
    kind = "integer" if isinstance(value, int) else "decimal"
    if value != value or value in (float("inf"), float("-inf")):
        raise bad_request(f"Invalid '{path}': expected a finite number.", param=path, code="invalid_value")
    if "maximum" in schema and value > schema["maximum"]:
        raise bad_request(
            f"Invalid '{path}': {kind} above maximum value. Expected a value <= {schema['maximum']}, but got {value} instead.",
            param=path, code=f"{kind}_above_max_value",
        )
    if "minimum" in schema and value < schema["minimum"]:
        raise bad_request(
            f"Invalid '{path}': {kind} below minimum value. Expected a value >= {schema['minimum']}, but got {value} instead.",
            param=path, code=f"{kind}_below_min_value",
        )


def _check_array(schema: Schema, value: list, path: str) -> None:
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        raise bad_request(
            f"Invalid '{path}': array too long. Expected an array with maximum length {schema['maxItems']}, "
            f"but got an array with length {len(value)} instead.",
            param=path, code="array_above_max_length",
        )
    if "minItems" in schema and len(value) < schema["minItems"]:
        raise bad_request(
            f"Invalid '{path}': empty array. Expected an array with minimum length {schema['minItems']}, "
            f"but got an array with length {len(value)} instead.",
            param=path, code="empty_array" if not value else "array_below_min_length",
        )
    if "items" in schema:
        for i, item in enumerate(value):
            validate(schema["items"], item, _join(path, i))


def _check_object(schema: Schema, value: dict, path: str) -> None:
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name not in properties:
            if extra is False:
                if not path:
                    raise bad_request(f"Unrecognized request argument supplied: {name}")
                raise bad_request(f"Unrecognized parameter: '{_join(path, name)}'.", param=_join(path, name),
                                  code="unknown_parameter")
            if isinstance(extra, dict):  # a map: every value follows the one schema
                validate(extra, item, _join(path, name))
            continue
        if not path and name in NEUTRAL_VALUES:
            if item not in NEUTRAL_VALUES[name]:
                raise bad_request(f"'{name}' is not supported yet: leave it unset.", param=name, code="unsupported_parameter")
            continue
        validate(properties[name], item, _join(path, name))
    for name in schema.get("required", ()):
        if name not in value:
            raise bad_request(
                f"Missing required parameter: '{_join(path, name)}'.",
                param=_join(path, name), code="missing_required_parameter",
            )


__all__ = ["ApiError", "validate"]
