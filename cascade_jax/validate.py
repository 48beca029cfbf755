"""The one set of value checks every config and step builder shares.

Each check takes the *key* the user wrote (`stages.child.grad_accum`, or an argument name for
library calls) and raises a `ValueError` that names the key, the bad value and what would be
accepted: `stages.child.grad_accum=True must be a positive integer`. Booleans are not integers
here (`True` would otherwise pass as 1), and integral floats are not integers either (a config
value of `2.0` is a typo worth a message, not a silent cast).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def positive_int(key: str, value: Any, hint: str = "") -> int:
    """`value` if it is an int >= 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{key}={value!r} must be a positive integer{_hint(hint)}")
    return value


def non_negative_int(key: str, value: Any, hint: str = "") -> int:
    """`value` if it is an int >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{key}={value!r} must be a non-negative integer{_hint(hint)}")
    return value


def optional_positive_int(key: str, value: Any, hint: str = "") -> int | None:
    """`value` if it is None or an int >= 1."""
    return None if value is None else positive_int(key, value, hint or "or None")


def number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """`value` as a float if it is a finite real number inside the stated bounds."""
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = _range(low, high, low_open, high_open)
        raise ValueError(f"{key}={value!r} must be a finite number{bounds}{_hint(hint)}")
    return float(value)


def positive_number(key: str, value: Any, hint: str = "") -> float:
    return number(key, value, low=0.0, low_open=True, hint=hint)


def temperature(key: str, value: Any) -> float:
    """A sampling temperature, checked under the key the user wrote (`judge_temperature`)."""
    return number(key, value, low=0.0, hint="0 samples greedily")


def int_list(key: str, value: Any, hint: str = "") -> list[int]:
    """`value` if it is a list of ints (a string of digits or a list of bools is not)."""
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise ValueError(f"{key}={str(value)[:80]!r} must be a list of integers{_hint(hint)}")
    return value


def optional_boolean(key: str, value: Any, hint: str = "") -> bool | None:
    """`value` if it is None, True or False."""
    return None if value is None else boolean(key, value, hint or "or null")


def boolean(key: str, value: Any, hint: str = "") -> bool:
    """`value` if it is True or False (not 'false', not 0)."""
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be True or False{_hint(hint)}")
    return value


def one_of(key: str, value: Any, choices: Collection[Any], hint: str = "") -> Any:
    """`value` if it is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {sorted(choices, key=str)}{_hint(hint)}")
    return value


def string(key: str, value: Any, *, allow_empty: bool = True, hint: str = "") -> str:
    if not isinstance(value, str) or (not allow_empty and not value):
        want = "a string" if allow_empty else "a non-empty string"
        raise ValueError(f"{key}={value!r} must be {want}{_hint(hint)}")
    return value


def fields(where: str, record: Mapping[str, Any],
           checks: Mapping[str, Callable[[str, Any], Any]]) -> None:
    """Each of `checks`' keys that `record` (a JSON object read from a file) holds, not null,
    passes its check (`positive_int`, `boolean`, ...), named `<where> <key>`: the one place a
    file's values are typed where they enter, so a string "false" is never read as true."""
    for name, check in checks.items():
        if record.get(name) is not None:
            check(f"{where} {name}", record[name])


def known_keys(key: str, given: Mapping[str, Any] | Collection[str],
               known: Collection[str]) -> None:
    """Refuse unknown fields by name (a typo must not pass silently as a default)."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        where = f"{key}." if key else ""
        raise ValueError(f"unknown config field(s) {[where + u for u in unknown]}; known fields "
                         f"of {key or 'the config'}: {sorted(known)}")


def construct(cls: type, values: Mapping[str, Any], key: str) -> Any:
    """`cls(**values)` for a dataclass that validates itself without knowing its config key
    (ModelConfig, LossSpec, Target): unknown fields are refused by name, and a ValueError or
    TypeError is re-raised prefixed with `key`, so the message still says where it came from."""
    known_keys(key, values, [f.name for f in dataclasses.fields(cls)])
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key}: {error}") from None


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
