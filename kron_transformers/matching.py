"""PEFT-style module targeting: names, suffixes, regexes and ``"all-linear"``."""

from __future__ import annotations

import re
from collections.abc import Iterable


ALL_LINEAR = "all-linear"


def _compile(pattern: str, field_name: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"KronConfig.{field_name}: {pattern!r} is not a valid regular expression ({error})") from None


def name_matches(entry: str, name: str) -> bool:
    """A list entry matches the exact module name or a dotted suffix of it (PEFT)."""
    return name == entry or name.endswith("." + entry)


def pattern_matches(pattern: str | list[str], names: Iterable[str], field_name: str) -> bool:
    """True when any of a module's names (aliases included) matches ``pattern``.

    A string is a regex matched against the whole name (``re.fullmatch``); a list holds exact
    names or suffixes. ``"all-linear"`` is resolved by the caller, which knows module types.
    """
    names = list(names)
    if isinstance(pattern, str):
        regex = _compile(pattern, field_name)
        return any(regex.fullmatch(name) for name in names)
    return any(name_matches(entry, name) for entry in pattern for name in names)


def rule_matches(key: str, names: Iterable[str]) -> bool:
    """A ``rules`` key matches as an exact name, a suffix, or a full-name regex."""
    names = list(names)
    if any(name_matches(key, name) for name in names):
        return True
    regex = _compile(key, f"rules[{key!r}]")
    return any(regex.fullmatch(name) for name in names)
