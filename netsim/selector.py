"""Label selectors as kubectl's -l reads them (apimachinery labels.Parse): equality-based
`k=v`, `k==v`, `k!=v`, set-based `k in (a,b)`, `k notin (a)`, `k` and `!k`, joined by commas.
Pure: text in, a predicate out; a bad selector is an error a user reads."""

from __future__ import annotations

import re
from collections.abc import Callable

from netsim.errors import NetsimError

_TERM = re.compile(
    r"""\s*(?:
        (?P<not>!)\s*(?P<absent>[\w./-]+)
      | (?P<skey>[\w./-]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)
      | (?P<ekey>[\w./-]+)\s*(?P<eq>==|!=|=)\s*(?P<value>[\w.-]*)
      | (?P<exists>[\w./-]+)
    )\s*(?:,|$)""",
    re.VERBOSE,
)

Labels = dict[str, str]


def parse(text: str) -> Callable[[Labels], bool]:
    """A predicate over labels for the selector `text` ("" selects everything)."""
    tests: list[Callable[[Labels], bool]] = []
    at = 0
    text = text.strip()
    while at < len(text):
        found = _TERM.match(text, at)
        if found is None or found.end() == at:
            raise NetsimError(
                f"unable to parse requirement {text[at:]!r} in the selector {text!r}: write "
                "k=v, k!=v, 'k in (a,b)', 'k notin (a)', k or !k, joined by commas"
            )
        at = found.end()
        tests.append(_term(found))
    return lambda labels: all(test(labels) for test in tests)


def _term(found: re.Match) -> Callable[[Labels], bool]:
    if found["absent"]:
        key = found["absent"]
        return lambda labels: key not in labels
    if found["skey"]:
        key, negate = found["skey"], found["op"] == "notin"
        values = {v.strip() for v in found["values"].split(",") if v.strip()}
        if not values:
            raise NetsimError(
                f"for 'in', 'notin' operators, values set can't be empty: {found.group(0)!r}"
            )
        if negate:
            return lambda labels: labels.get(key) not in values
        return lambda labels: labels.get(key) in values
    if found["ekey"]:
        key, value = found["ekey"], found["value"]
        if found["eq"] == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    key = found["exists"]
    return lambda labels: key in labels
