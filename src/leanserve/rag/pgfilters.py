"""OpenAI attribute filters as a Postgres WHERE clause over a jsonb column.

The same semantics as rag/filters.py `matches` (the test suite checks the two agree row by
row): `eq` is typed equality (the string "1" is not the number 1, true is not 1; 1 = 1.0);
`ne` and `nin` pass a row that lacks the key; `gt`/`gte`/`lt`/`lte` compare numbers with
numbers and strings with strings (by code point, hence COLLATE "C"), anything else fails;
`in` and `nin` take a list; `and` / `or` nest. Keys and values are always bound parameters.
"""
from __future__ import annotations

from psycopg.types.json import Jsonb

_ORDER = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def to_sql(filters: dict | None, column: str) -> tuple[str, list]:
    """(sql, params) for an already validated filter; ("TRUE", []) for none."""
    if filters is None:
        return "TRUE", []
    params: list = []
    return _clause(filters, column, params), params


def _clause(f: dict, col: str, params: list) -> str:
    kind = f["type"]
    if kind in ("and", "or"):
        parts = [_clause(sub, col, params) for sub in f["filters"]]
        if not parts:
            return "TRUE" if kind == "and" else "FALSE"
        return "(" + f" {kind.upper()} ".join(parts) + ")"
    key, value = f["key"], f["value"]
    if kind == "eq":
        params += [key, Jsonb(value)]
        return f"({col} -> %s) = %s::jsonb"
    if kind == "ne":
        params += [key, Jsonb(value)]
        return f"({col} -> %s) IS DISTINCT FROM %s::jsonb"
    if kind in ("in", "nin"):
        params += [key, [Jsonb(v) for v in value]]
        test = f"coalesce(({col} -> %s) = ANY(%s::jsonb[]), FALSE)"
        return test if kind == "in" else f"NOT {test}"
    op = _ORDER[kind]
    if isinstance(value, bool):
        return "FALSE"
    if isinstance(value, (int, float)):
        params += [key, key, value]
        # CASE, not AND: Postgres may evaluate AND's operands in any order, and a string
        # cast to numeric raises.
        return (f"CASE WHEN jsonb_typeof({col} -> %s) = 'number' "
                f"THEN ({col} -> %s)::numeric {op} %s::numeric ELSE FALSE END")
    params += [key, key, value]
    return f"(jsonb_typeof({col} -> %s) = 'string' AND ({col} ->> %s) COLLATE \"C\" {op} %s)"
