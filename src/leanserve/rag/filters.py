"""OpenAI's attribute filters for vector-store search, and the attributes they test.

A comparison `{"type": "eq"|"ne"|"gt"|"gte"|"lt"|"lte"|"in"|"nin", "key", "value"}` or a
compound `{"type": "and"|"or", "filters": [...]}`. `validate` checks a filter once, when a
request arrives; `matches` then trusts it. Types are strict: `true` does not equal `1`,
and an ordering comparison between a string and a number is false (not an error), so one
file with an odd attribute cannot break a search. A key the attributes lack fails every
comparison except `ne` and `nin`.
"""
from __future__ import annotations

import math

from ..errors import InvalidRequest

COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")
COMPOUNDS = ("and", "or")
MAX_DEPTH = 8  # nesting of compound filters
MAX_FILTERS = 64  # filter objects in one request, compounds included
MAX_LIST = 256  # values in one in / nin list
MAX_ATTRIBUTES = 16
MAX_KEY_CHARS = 64
MAX_STRING_CHARS = 512


def _kind(value) -> str | None:
    """'bool', 'number' or 'str'; None for anything an attribute cannot be."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number" if math.isfinite(value) else None
    return "str" if isinstance(value, str) else None


def validate(filters, param: str = "filters") -> None:
    """Raises InvalidRequest naming the offending field (e.g. `filters.filters[1].type`)."""
    count = [0]

    def check(f, param: str, depth: int) -> None:
        count[0] += 1
        if count[0] > MAX_FILTERS:
            raise InvalidRequest(f"A search takes at most {MAX_FILTERS} filters", param)
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"Filters nest at most {MAX_DEPTH} levels deep", param)
        if not isinstance(f, dict):
            raise InvalidRequest("A filter must be an object", param)
        kind = f.get("type")
        if kind in COMPOUNDS:
            _only(f, ("type", "filters"), param)
            subs = f.get("filters")
            if not isinstance(subs, list) or not subs:
                raise InvalidRequest(f"An '{kind}' filter needs a non-empty 'filters' list", f"{param}.filters")
            for i, sub in enumerate(subs):
                check(sub, f"{param}.filters[{i}]", depth + 1)
        elif kind in COMPARISONS:
            _only(f, ("type", "key", "value"), param)
            _comparison(f, kind, param)
        else:
            raise InvalidRequest(f"Filter 'type' must be one of {', '.join(COMPARISONS + COMPOUNDS)}; got {kind!r}",
                                 f"{param}.type")

    check(filters, param, 1)


def _only(f: dict, allowed: tuple, param: str) -> None:
    extra = sorted(set(f) - set(allowed))
    if extra:
        raise InvalidRequest(f"Unknown field '{extra[0]}' in a '{f['type']}' filter", f"{param}.{extra[0]}")


def _comparison(f: dict, kind: str, param: str) -> None:
    key = f.get("key")
    if not isinstance(key, str) or not key:
        raise InvalidRequest("A comparison filter needs a non-empty string 'key'", f"{param}.key")
    if "value" not in f:
        raise InvalidRequest("A comparison filter needs a 'value'", f"{param}.value")
    value = f["value"]
    if kind in ("in", "nin"):
        if not isinstance(value, list) or len(value) > MAX_LIST:
            raise InvalidRequest(f"An '{kind}' filter's value must be a list of at most {MAX_LIST} values",
                                 f"{param}.value")
        for i, v in enumerate(value):
            if _kind(v) is None:
                raise InvalidRequest("List values must be strings, finite numbers or booleans",
                                     f"{param}.value[{i}]")
    elif kind in ("gt", "gte", "lt", "lte"):
        if _kind(value) not in ("number", "str"):
            raise InvalidRequest(f"A '{kind}' filter compares with a finite number or a string", f"{param}.value")
    elif _kind(value) is None:
        raise InvalidRequest(f"An '{kind}' filter's value must be a string, a finite number or a boolean",
                             f"{param}.value")


def matches(filters: dict, attributes: dict) -> bool:
    """Whether `attributes` pass the (validated) `filters`."""
    kind = filters["type"]
    if kind == "and":
        return all(matches(f, attributes) for f in filters["filters"])
    if kind == "or":
        return any(matches(f, attributes) for f in filters["filters"])
    key, want = filters["key"], filters["value"]
    if key not in attributes:
        return kind in ("ne", "nin")
    have = attributes[key]
    if kind in ("in", "nin"):
        found = any(_equal(have, v) for v in want)
        return found if kind == "in" else not found
    if kind == "eq":
        return _equal(have, want)
    if kind == "ne":
        return not _equal(have, want)
    if _kind(have) != _kind(want) or _kind(have) not in ("number", "str"):
        return False
    if kind == "gt":
        return have > want
    if kind == "gte":
        return have >= want
    if kind == "lt":
        return have < want
    return have <= want


def _equal(a, b) -> bool:
    return _kind(a) == _kind(b) and a == b


def validate_attributes(attributes, param: str = "attributes") -> None:
    """OpenAI's limits: up to 16 keys of at most 64 characters; values strings of at most
    512 characters, finite numbers or booleans."""
    if not isinstance(attributes, dict):
        raise InvalidRequest("'attributes' must be an object", param)
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidRequest(f"At most {MAX_ATTRIBUTES} attributes, got {len(attributes)}", param)
    for key, value in attributes.items():
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
            raise InvalidRequest(f"Attribute keys are strings of 1 to {MAX_KEY_CHARS} characters; got {key!r:.80}",
                                 param)
        kind = _kind(value)
        if kind is None:
            raise InvalidRequest(f"Attribute '{key}' must be a string, a finite number or a boolean",
                                 f"{param}.{key}")
        if kind == "str" and len(value) > MAX_STRING_CHARS:
            raise InvalidRequest(f"Attribute '{key}' is longer than {MAX_STRING_CHARS} characters", f"{param}.{key}")
