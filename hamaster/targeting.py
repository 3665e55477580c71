"""Salt-compatible targeting: decide whether a minion id (and its grains) matches a target.

Pure functions, no I/O. The minion uses :func:`matches` on every publication; the master uses
:func:`check_minions` to know which minions it expects a return from.

Supported ``tgt_type`` values: ``glob``, ``list``, ``pcre``, ``grain``, ``grain_pcre``,
``ipcidr``, ``pillar``, ``pillar_pcre``, ``pillar_exact`` and ``compound`` (``I@``, ``J@``
included). Pillar targets match the ``pillar`` given (the minion's own, or the master's minion
data cache); without one they do not match. ``nodegroup`` (and ``N@``) must be expanded first
(:func:`expand_nodegroups`).
Malformed targets raise :class:`ValueError` with a message naming the problem.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_PILLAR_TYPES = frozenset({"pillar", "pillar_pcre", "pillar_exact"})
_ID_ONLY_TYPES = frozenset({"glob", "list", "pcre"})
_OPERATORS = frozenset({"and", "or", "not"})
# Engine letter, an optional one-character delimiter (grain/pillar engines only), then "@".
_ENGINE_RE = re.compile(r"^(?P<engine>[A-Za-z])(?P<delim>(?<=[GPIJ])[^@\s])?@(?P<pattern>.*)$")


# --------------------------------------------------------------------------- simple matchers


def _glob(pattern: str, minion_id: str) -> bool:
    return fnmatch.fnmatchcase(minion_id, pattern)


def _in_list(tgt: str | Sequence[str], minion_id: str) -> bool:
    items = tgt.split(",") if isinstance(tgt, str) else [str(x) for x in tgt]
    return minion_id in {item.strip() for item in items}


def _compile(pattern: str, flags: int = 0) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None


def _pcre(pattern: str, minion_id: str) -> bool:
    return _compile(pattern).match(minion_id) is not None


def _value_matches(value: Any, pattern: str, regex: bool) -> bool:
    """Match one grain value (scalar, list or dict) against a glob or regex, ignoring case."""
    if isinstance(value, (list, tuple, set)):
        return any(_value_matches(item, pattern, regex) for item in value)
    if isinstance(value, Mapping):
        return any(_value_matches(key, pattern, regex) for key in value)
    text = str(value)
    if regex:
        return _compile(pattern, re.IGNORECASE).match(text) is not None
    return fnmatch.fnmatchcase(text.lower(), pattern.lower())


def _lookup(data: Any, path: Sequence[str]) -> tuple[bool, Any]:
    """Walk nested dicts (and lists by index); returns (found, value)."""
    cur = data
    for part in path:
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif (isinstance(cur, list) and part.lstrip("-").isdigit()
              and -len(cur) <= int(part) < len(cur)):
            cur = cur[int(part)]
        else:
            return False, None
    return True, cur


def _check_grain_expr(expr: str, delimiter: str) -> None:
    if not delimiter:
        raise ValueError("grain delimiter must not be empty")
    if delimiter not in expr:
        raise ValueError(
            f"grain target {expr!r} must look like 'key{delimiter}value' "
            f"(nested keys separated by {delimiter!r})"
        )


def _grain_match(expr: str, grains: Mapping[str, Any], delimiter: str, regex: bool) -> bool:
    """Match ``key[:subkey...]:pattern`` against grains.

    As the pattern may itself contain the delimiter, every split point is tried, shortest key
    path first; the first split whose key path exists and whose value matches wins.
    """
    parts = expr.split(delimiter)
    for split in range(1, len(parts)):
        found, value = _lookup(grains, parts[:split])
        if found and _value_matches(value, delimiter.join(parts[split:]), regex):
            return True
    return False


def _ipcidr(tgt: str, grains: Mapping[str, Any]) -> bool:
    try:
        net = ipaddress.ip_network(tgt.strip(), strict=False)
    except ValueError as exc:
        raise ValueError(f"invalid ipcidr target {tgt!r}: {exc}") from None
    key = "ipv4" if net.version == 4 else "ipv6"
    for addr in grains.get(key) or []:
        try:
            if ipaddress.ip_address(str(addr)) in net:
                return True
        except ValueError:
            continue
    return False


# --------------------------------------------------------------------------- compound parser


@dataclass(frozen=True)
class _Term:
    engine: str  # "" for a bare glob
    pattern: str
    delimiter: str | None


@dataclass(frozen=True)
class _Not:
    operand: _Node


@dataclass(frozen=True)
class _BinOp:
    op: str  # "and" | "or"
    left: _Node
    right: _Node


_Node = _Term | _Not | _BinOp


def _tokenize(tgt: str) -> list[str]:
    """Split on whitespace; peel leading '(' and unbalanced trailing ')' off words."""
    tokens: list[str] = []
    for word in tgt.split():
        while word.startswith("("):
            tokens.append("(")
            word = word[1:]
        trailing = 0
        while word.endswith(")") and word.count(")") > word.count("("):
            trailing += 1
            word = word[:-1]
        if word:
            tokens.append(word)
        tokens.extend(")" * trailing)
    return tokens


def _make_term(word: str) -> _Term:
    m = _ENGINE_RE.match(word)
    if not m:
        return _Term("", word, None)
    engine = m.group("engine")
    if engine not in "GPLEIJS":
        if engine == "N":
            raise ValueError(f"nodegroup term {word!r} must be expanded by the master first")
        if engine == "R":
            raise ValueError(f"range targeting ({word!r}) is not supported")
        raise ValueError(f"unknown target engine {engine!r}@ in {word!r}")
    if not m.group("pattern"):
        raise ValueError(f"empty pattern in compound term {word!r}")
    return _Term(engine, m.group("pattern"), m.group("delim"))


class _Parser:
    """Recursive descent over tokens. Precedence: not > and > or.

    Like Salt, ``not`` directly after an operand means ``and not``.
    """

    def __init__(self, tokens: list[str], tgt: str) -> None:
        self.tokens = tokens
        self.pos = 0
        self.tgt = tgt

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _error(self, why: str) -> ValueError:
        return ValueError(f"malformed compound target {self.tgt!r}: {why}")

    def parse(self) -> _Node:
        if not self.tokens:
            raise self._error("it is empty")
        node = self._or()
        tok = self._peek()
        if tok is not None:
            if tok == ")":
                raise self._error("unbalanced ')'")
            raise self._error(f"missing 'and'/'or' before {tok!r}")
        return node

    def _or(self) -> _Node:
        node = self._and()
        while self._peek() == "or":
            self.pos += 1
            node = _BinOp("or", node, self._and())
        return node

    def _and(self) -> _Node:
        node = self._not()
        while self._peek() in ("and", "not"):
            if self._peek() == "and":
                self.pos += 1
            node = _BinOp("and", node, self._not())
        return node

    def _not(self) -> _Node:
        if self._peek() == "not":
            self.pos += 1
            return _Not(self._not())
        return self._primary()

    def _primary(self) -> _Node:
        tok = self._peek()
        if tok is None:
            raise self._error("it ends with an operator")
        if tok == "(":
            self.pos += 1
            node = self._or()
            if self._peek() != ")":
                raise self._error("unbalanced '(' (missing ')')")
            self.pos += 1
            return node
        if tok == ")":
            raise self._error("unexpected ')'" if self.pos else "it starts with ')'")
        if tok in ("and", "or"):
            raise self._error(f"operator {tok!r} is missing an operand")
        self.pos += 1
        return _make_term(tok)


def parse_compound(tgt: str) -> _Node:
    """Parse a compound target into a tree; raises ValueError when it is malformed."""
    if not isinstance(tgt, str):
        raise ValueError(f"compound target must be a string, got {type(tgt).__name__}")
    return _Parser(_tokenize(tgt), tgt).parse()


def _pillar_exact(expr: str, pillar: Mapping[str, Any], delimiter: str) -> bool:
    """``key[:subkey...]:value`` where the value equals (as a string) or, for a list, contains
    it."""
    parts = expr.split(delimiter)
    for split in range(1, len(parts)):
        found, value = _lookup(pillar, parts[:split])
        want = delimiter.join(parts[split:])
        if found and (str(value) == want if not isinstance(value, list)
                      else any(str(v) == want for v in value)):
            return True
    return False


def _eval_term(term: _Term, minion_id: str, grains: Mapping[str, Any], delimiter: str,
               pillar: Mapping[str, Any] | None = None) -> bool:
    engine = term.engine
    if engine == "":
        return _glob(term.pattern, minion_id)
    if engine == "L":
        return _in_list(term.pattern, minion_id)
    if engine == "E":
        return _pcre(term.pattern, minion_id)
    if engine in "GP":
        return _grain_match(term.pattern, grains, term.delimiter or delimiter, engine == "P")
    if engine == "S":
        return _ipcidr(term.pattern, grains)
    # I@ (pillar glob) and J@ (pillar regex)
    return _grain_match(term.pattern, pillar or {}, term.delimiter or delimiter, engine == "J")


def _evaluate(node: _Node, minion_id: str, grains: Mapping[str, Any], delimiter: str,
              pillar: Mapping[str, Any] | None = None) -> bool:
    if isinstance(node, _Term):
        return _eval_term(node, minion_id, grains, delimiter, pillar)
    if isinstance(node, _Not):
        return not _evaluate(node.operand, minion_id, grains, delimiter, pillar)
    left = _evaluate(node.left, minion_id, grains, delimiter, pillar)
    if node.op == "and":
        return left and _evaluate(node.right, minion_id, grains, delimiter, pillar)
    return left or _evaluate(node.right, minion_id, grains, delimiter, pillar)


def _validate_terms(node: _Node, delimiter: str) -> None:
    """Check every term once, so errors don't depend on which branch gets evaluated."""
    if isinstance(node, _Not):
        _validate_terms(node.operand, delimiter)
    elif isinstance(node, _BinOp):
        _validate_terms(node.left, delimiter)
        _validate_terms(node.right, delimiter)
    elif node.engine == "E":
        _compile(node.pattern)
    elif node.engine == "S":
        _ipcidr(node.pattern, {})
    elif node.engine in ("G", "P", "I", "J"):
        _check_grain_expr(node.pattern, node.delimiter or delimiter)


# --------------------------------------------------------------------------- public API


_Match = Callable[[str, Mapping[str, Any], "Mapping[str, Any] | None"], bool]


def _compiled(tgt: Any, tgt_type: str, delimiter: str) -> _Match:
    """Validate a target once and return ``f(minion_id, grains, pillar) -> bool``."""
    if tgt_type == "glob":
        return lambda mid, _g, _p: _glob(str(tgt), mid)
    if tgt_type == "list":
        return lambda mid, _g, _p: _in_list(tgt, mid)
    if tgt_type == "pcre":
        rx = _compile(str(tgt))
        return lambda mid, _g, _p: rx.match(mid) is not None
    if tgt_type in ("grain", "grain_pcre"):
        _check_grain_expr(str(tgt), delimiter)
        regex = tgt_type == "grain_pcre"
        return lambda _m, g, _p: _grain_match(str(tgt), g, delimiter, regex)
    if tgt_type == "ipcidr":
        _ipcidr(str(tgt), {})
        return lambda _m, g, _p: _ipcidr(str(tgt), g)
    if tgt_type == "compound":
        tree = parse_compound(tgt)
        _validate_terms(tree, delimiter)
        return lambda mid, g, p: _evaluate(tree, mid, g, delimiter, p)
    if tgt_type in ("pillar", "pillar_pcre"):
        _check_grain_expr(str(tgt), delimiter)
        regex = tgt_type == "pillar_pcre"
        return lambda _m, _g, p: _grain_match(str(tgt), p or {}, delimiter, regex)
    if tgt_type == "pillar_exact":
        _check_grain_expr(str(tgt), delimiter)
        return lambda _m, _g, p: _pillar_exact(str(tgt), p or {}, delimiter)
    if tgt_type == "nodegroup":
        raise ValueError("nodegroup targets must be expanded into a compound target by the master")
    raise ValueError(f"unknown target type {tgt_type!r}")


def expand_nodegroups(tgt: Any, tgt_type: str, nodegroups: Mapping[str, Any],
                      depth: int = 0) -> tuple[Any, str]:
    """``(tgt, tgt_type)`` with a ``nodegroup`` target or ``N@`` terms replaced by their
    definitions from the ``nodegroups`` option (a compound string or a list of ids)."""
    if depth > 10:
        raise ValueError("nodegroups nest more than 10 levels (a nodegroup refers to itself?)")

    def one(name: str) -> str:
        group = nodegroups.get(name)
        if group is None:
            raise ValueError(f"nodegroup {name!r} is not defined in the nodegroups option")
        if isinstance(group, (list, tuple)):
            return "L@" + ",".join(str(x) for x in group)
        inner, _ = expand_nodegroups(str(group), "compound", nodegroups, depth + 1)
        return f"( {inner} )"

    if tgt_type == "nodegroup":
        return one(str(tgt)), "compound"
    if tgt_type == "compound" and isinstance(tgt, str) and "N@" in tgt:
        words = []
        for word in tgt.split():
            stripped = word.lstrip("(")
            lead = word[:len(word) - len(stripped)]
            core = stripped.rstrip(")")
            trail = stripped[len(core):]
            if core.startswith("N@"):
                word = f"{lead}{one(core[2:])}{trail}"
            words.append(word)
        return " ".join(words), "compound"
    return tgt, tgt_type


def matches(tgt: Any, tgt_type: str, minion_id: str, grains: Mapping[str, Any],
            delimiter: str = ":", pillar: Mapping[str, Any] | None = None) -> bool:
    """Return True when ``minion_id`` (with ``grains``) is selected by ``tgt`` of ``tgt_type``.

    Raises ValueError for an unknown ``tgt_type``, a nodegroup, or a malformed target
    (bad regex, unbalanced parentheses, dangling operator); callers on the minion treat
    that as "not for me".
    """
    return _compiled(tgt, tgt_type, delimiter)(minion_id, grains or {}, pillar)


def check_minions(tgt: Any, tgt_type: str, minion_ids: Sequence[str],
                  grains_of: Callable[[str], Mapping[str, Any] | None],
                  delimiter: str = ":",
                  pillar_of: Callable[[str], Mapping[str, Any] | None] | None = None
                  ) -> list[str]:
    """Return, in input order, the ids among ``minion_ids`` that the target selects.

    ``grains_of(id)`` gives a minion's cached grains or None when unknown. A minion with
    unknown grains is included only for id-based targets (glob, list, pcre). The target is
    validated once up front, so a malformed target raises ValueError even with no minions.
    ``pillar_of(id)`` gives a minion's cached pillar (pillar targets need it).
    """
    match = _compiled(tgt, tgt_type, delimiter)
    id_only = tgt_type in _ID_ONLY_TYPES
    needs_pillar = tgt_type in _PILLAR_TYPES
    selected: list[str] = []
    for minion_id in minion_ids:
        grains = grains_of(minion_id)
        if grains is None and not id_only and not needs_pillar:
            continue
        pillar = pillar_of(minion_id) if pillar_of is not None else None
        if match(minion_id, grains or {}, pillar):
            selected.append(minion_id)
    return selected
