"""Calico's selector expressions (libcalico-go lib/selector): `all()`, `has(k)`, `k == 'v'`,
`k != 'v'`, `k in {'a', 'b'}`, `k not in {...}`, `k contains 'x'`, `k starts with 'x'`,
`k ends with 'x'`, joined by `&&`, `||`, `!` and parentheses. Pure: text in, a hashable tree
out (equal selectors share one IP set), and a predicate over a label mapping.

Kubernetes' LabelSelectors are turned into this syntax as Calico's converter does, so every
selector of every policy is read by one evaluator."""

from __future__ import annotations

import re

from netsim.errors import NetsimError

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>'[^']*'|"[^"]*")
      | (?P<op>&&|\|\||==|!=|!|\(|\)|\{|\}|,)
      | (?P<word>[A-Za-z0-9_./-]+)
    )""",
    re.VERBOSE,
)
_KEY = re.compile(r"[A-Za-z0-9_./-]+")

Tree = tuple  # ("all",) ("has", k) ("eq"|"ne"|"contains"|"starts"|"ends", k, v)
# ("in"|"notin", k, frozenset) ("not", t) ("and", a, b) ("or", a, b)


def parse(text: str) -> Tree:
    """The tree of a selector; NetsimError naming what is wrong where. "" means all()."""
    if not isinstance(text, str):
        raise NetsimError(f"a selector is a string, not {text!r}")
    tokens = _tokens(text)
    if not tokens:
        return ("all",)
    parser = _Parser(text, tokens)
    tree = parser.expression()
    if parser.at < len(tokens):
        parser.fail(f"unexpected {tokens[parser.at][1]!r}")
    return tree


def _tokens(text: str) -> list[tuple[str, str]]:
    found, at = [], 0
    while at < len(text):
        if text[at:].strip() == "":
            break
        match = _TOKEN.match(text, at)
        if match is None or match.end() == at:
            raise NetsimError(
                f"selector {text!r}: cannot read {text[at:].strip()[:20]!r} (at character "
                f"{at + 1}); write e.g. \"role == 'db' && has(app)\""
            )
        kind = match.lastgroup or ""
        found.append((kind, match.group(kind)))
        at = match.end()
    return found


class _Parser:
    def __init__(self, text: str, tokens: list[tuple[str, str]]):
        self.text, self.tokens, self.at = text, tokens, 0

    def fail(self, problem: str):
        raise NetsimError(
            f"selector {self.text!r}: {problem}; write e.g. \"role == 'db' && "
            "environment in {'dev', 'stage'}\", all() or has(label)"
        )

    def peek(self) -> str:
        return self.tokens[self.at][1] if self.at < len(self.tokens) else ""

    def take(self, kind: str = "", value: str = "") -> str:
        if self.at >= len(self.tokens):
            self.fail("it ends too early")
        found_kind, found = self.tokens[self.at]
        if (kind and found_kind != kind) or (value and found != value):
            self.fail(f"expected {value or kind} at {found!r}")
        self.at += 1
        return found

    def expression(self) -> Tree:
        tree = self.conjunction()
        while self.peek() == "||":
            self.take()
            tree = ("or", tree, self.conjunction())
        return tree

    def conjunction(self) -> Tree:
        tree = self.term()
        while self.peek() == "&&":
            self.take()
            tree = ("and", tree, self.term())
        return tree

    def term(self) -> Tree:
        word = self.peek()
        if word == "!":
            self.take()
            return ("not", self.term())
        if word == "(":
            self.take()
            tree = self.expression()
            self.take("op", ")")
            return tree
        key = self.take("word")
        if key in ("all", "has", "global") and self.peek() == "(":
            self.take()
            if key == "has":
                inner = self.take("word")
                self.take("op", ")")
                return ("has", inner)
            self.take("op", ")")
            return ("all",)  # global(): every endpoint (there are no host endpoints here)
        if not _KEY.fullmatch(key):
            self.fail(f"{key!r} is not a label key")
        op = self.take()
        if op in ("==", "!="):
            return ("eq" if op == "==" else "ne", key, self.value())
        if op == "not":
            self.take("word", "in")
            return ("notin", key, self.values())
        if op == "in":
            return ("in", key, self.values())
        if op == "contains":
            return ("contains", key, self.value())
        if op in ("starts", "ends"):
            self.take("word", "with")
            return (op, key, self.value())
        self.fail(f"unknown operator {op!r} after {key!r}")
        raise AssertionError  # unreachable: fail raises

    def value(self) -> str:
        return self.take("str")[1:-1]

    def values(self) -> frozenset:
        self.take("op", "{")
        found = []
        while self.peek() != "}":
            found.append(self.value())
            if self.peek() == ",":
                self.take()
        self.take("op", "}")
        return frozenset(found)


def matches(tree: Tree, labels: dict[str, str]) -> bool:
    op = tree[0]
    if op == "all":
        return True
    if op == "has":
        return tree[1] in labels
    if op == "not":
        return not matches(tree[1], labels)
    if op == "and":
        return matches(tree[1], labels) and matches(tree[2], labels)
    if op == "or":
        return matches(tree[1], labels) or matches(tree[2], labels)
    value = labels.get(tree[1])
    if op == "ne":
        return value != tree[2]
    if value is None:
        return op == "notin"
    if op == "eq":
        return value == tree[2]
    if op == "in":
        return value in tree[2]
    if op == "notin":
        return value not in tree[2]
    if op == "contains":
        return tree[2] in value
    if op == "starts":
        return value.startswith(tree[2])
    return value.endswith(tree[2])  # ends


def text(tree: Tree) -> str:
    """The tree written back in Calico's syntax (canonical: sets sorted)."""
    op = tree[0]
    if op == "all":
        return "all()"
    if op == "has":
        return f"has({tree[1]})"
    if op == "not":
        return f"!{_grouped(tree[1])}"
    if op in ("and", "or"):
        joint = " && " if op == "and" else " || "
        return joint.join(_grouped(t, op) for t in tree[1:])
    if op in ("in", "notin"):
        values = ", ".join(f"'{v}'" for v in sorted(tree[2]))
        return f"{tree[1]} {'in' if op == 'in' else 'not in'} {{{values}}}"
    words = {"eq": "==", "ne": "!=", "contains": "contains", "starts": "starts with"}
    return f"{tree[1]} {words.get(op, 'ends with')} '{tree[2]}'"


def _grouped(tree: Tree, within: str = "") -> str:
    inner = text(tree)
    return inner if tree[0] not in ("and", "or") or tree[0] == within else f"({inner})"


def from_label_selector(match_labels: dict[str, str], expressions: list[dict]) -> Tree:
    """A Kubernetes LabelSelector (already checked) as Calico's converter writes it: each
    requirement ANDed; an empty selector is all()."""
    terms: list[Tree] = [("eq", k, v) for k, v in sorted(match_labels.items())]
    for item in expressions:
        key, op, values = item["key"], item["operator"], frozenset(item.get("values") or ())
        terms.append(
            {
                "In": ("in", key, values),
                "NotIn": ("notin", key, values),
                "Exists": ("has", key),
                "DoesNotExist": ("not", ("has", key)),
            }[op]
        )
    if not terms:
        return ("all",)
    tree = terms[0]
    for term in terms[1:]:
        tree = ("and", tree, term)
    return tree
