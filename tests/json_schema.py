"""A JSON Schema check for the tests, for the keywords our generated schemas use.

The `jsonschema` package is used when it is installed; it is not a dependency, so without it this
small validator checks the subset pydantic emits (type, properties, required,
additionalProperties, items, $ref into $defs, anyOf, enum, const, minimum, maximum) and refuses
any other validating keyword rather than silently ignoring it.
"""

from __future__ import annotations

from typing import Any

ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description", "default", "examples", "readOnly", "writeOnly"}
TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def validate(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Every violation as 'path: problem'; empty when the instance is valid."""
    try:
        import jsonschema
    except ImportError:
        return _check(instance, schema, schema, "$")
    validator = jsonschema.Draft202012Validator(schema)
    return [f"$.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


def _check(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str) -> list[str]:
    unknown = set(schema) - ANNOTATIONS - {
        "$ref", "type", "properties", "required", "additionalProperties", "items", "anyOf", "enum",
        "const", "minimum", "maximum",
    }  # fmt: skip
    if unknown:
        raise NotImplementedError(f"{path}: schema keyword(s) {sorted(unknown)} not supported here")
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return _check(value, root["$defs"][name], root, path)
    problems: list[str] = []
    if "anyOf" in schema:
        if all(_check(value, option, root, path) for option in schema["anyOf"]):
            problems.append(f"{path}: matches none of anyOf")
    kind = schema.get("type")
    if kind is not None:
        expected = TYPES[kind]
        is_bool = isinstance(value, bool)
        if not isinstance(value, expected) or (is_bool and kind in ("integer", "number")):
            return problems + [f"{path}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        problems.append(f"{path}: {value!r} is not {schema['const']!r}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        problems.append(f"{path}: {value} < minimum {schema['minimum']}")
    if "maximum" in schema and isinstance(value, (int, float)) and value > schema["maximum"]:
        problems.append(f"{path}: {value} > maximum {schema['maximum']}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{path}: missing required {key!r}")
        for key, item in value.items():
            if key in properties:
                problems += _check(item, properties[key], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{path}: unexpected key {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += _check(item, schema["additionalProperties"], root, f"{path}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += _check(item, schema["items"], root, f"{path}[{i}]")
    return problems
