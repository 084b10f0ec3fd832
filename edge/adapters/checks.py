"""What the request translators require of a body's shape, and how they say it is wrong.

The endpoints validate a body only as far as they need (edge.endpoints.body); a translator reads
every field, so a value of the wrong type is a 400 naming its path (`messages[2].content`), never
a TypeError that would reach the client as a 500.
"""

from __future__ import annotations

from typing import Any, NoReturn

from edge.adapters.table import MAPPED, REFUSED, Rule
from edge.errors import BadRequest


def fail(param: str, message: str) -> NoReturn:
    raise BadRequest(message, param=param)


def screen(data: dict[str, Any], table: dict[str, Rule], api: str) -> dict[str, Any]:
    """The fields of `data` the translator maps, in order, after the table's verdict on each:
    null and dropped fields left out, refused and unknown ones 400 (`api`: the target's)."""
    mapped: dict[str, Any] = {}
    for name, value in data.items():
        if value is None:
            continue
        rule = table.get(name)
        if rule is None:
            fail(
                name, f"'{name}' cannot be translated for this model, whose provider speaks {api}."
            )
        if rule.action == MAPPED:
            mapped[name] = value
        elif rule.action == REFUSED and not any(same(value, ok) for ok in rule.harmless):
            fail(
                name,
                f"'{name}' cannot be translated for this model, whose provider speaks {api}: "
                f"{rule.what}.",
            )
    return mapped


def same(value: Any, other: Any) -> bool:
    """Equal, with booleans apart from numbers (`1 == True` in Python, not in JSON)."""
    if isinstance(value, bool) or isinstance(other, bool):
        return value is other
    return bool(value == other)


def obj(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        fail(param, f"'{param}' must be an object.")
    return value


def array(value: Any, param: str) -> list[Any]:
    if not isinstance(value, list):
        fail(param, f"'{param}' must be an array.")
    return value


def string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        fail(param, f"'{param}' must be a string.")
    return value


def number(value: Any, param: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(param, f"'{param}' must be a number.")
    return value


def whole(value: Any, param: str, least: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        fail(param, f"'{param}' must be a whole number >= {least}.")
    return value


def boolean(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        fail(param, f"'{param}' must be true or false.")
    return value
