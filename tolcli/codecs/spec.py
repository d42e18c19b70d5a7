"""Codec spec strings: ``int4(group=32,symmetric=true)``, ``svd(rank=64,a=int4(group=32))``.

Grammar (whitespace between tokens is ignored)::

    spec  := NAME [ "(" [ KEY "=" value { "," KEY "=" value } ] ")" ]
    value := spec | WORD
    NAME, KEY, WORD := one or more of  A-Z a-z 0-9 _ . + -

``NAME`` is a codec with a spec (:class:`~tolcli.codecs.base.CodecSpec`); each ``KEY`` is a field of that
spec, given at most once; each value is converted to the field's type: ``true`` / ``false``, an integer, a
finite number, a word, or, for a spec-valued field, a nested spec (``a=int4`` is ``a=int4()``). Omitted
fields keep their defaults. Nothing is evaluated; anything else is a :class:`~tolcli.errors.UsageError`
naming the position. ``str(spec)`` writes the canonical string back (non-default fields only).
"""

from __future__ import annotations

import math
import re
import types
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from tolcli.codecs.base import Codec, CodecSpec
from tolcli.errors import UsageError

_TOKEN = re.compile(r"\s*(?:(?P<word>[A-Za-z0-9_.+-]+)|(?P<punct>[(),=])|(?P<bad>\S))")
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
MAX_DEPTH = 8
_SYNTAX = "a spec is NAME or NAME(KEY=VALUE,...), e.g. svd(rank=64,a=int4(group=32))"


def spec_names() -> list[str]:
    """The codecs a spec string can name."""
    return sorted(n for n, c in Codec.registry.items() if "spec" in c.__dict__)


def spec_class(name: str) -> type[CodecSpec]:
    codec = Codec.registry.get(name)
    if codec is None or "spec" not in codec.__dict__:
        raise UsageError(f"unknown codec {name!r}; choose one of {', '.join(spec_names())}")
    return codec.__dict__["spec"]


def split_items(text: str) -> list[str]:
    """Split on the commas outside parentheses: ``"int4,svd(rank=8,a=int4)"`` -> ``["int4", "svd(rank=8,a=int4)"]``."""
    items, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth <= 0:
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur).strip())
    return [i for i in items if i]


# ---- parsing: text -> tree -> spec ------------------------------------------------------------------------
@dataclass
class _Word:
    text: str
    pos: int


@dataclass
class _Call:
    name: str
    args: dict[str, tuple[int, _Call | _Word]]  # key -> (its position, its value)
    pos: int


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        for m in _TOKEN.finditer(text):
            kind = m.lastgroup or "bad"
            self.tokens.append((kind, m.group(kind), m.start(kind)))
        self.tokens.append(("end", "", len(text)))
        self.i = 0

    def error(self, what: str, pos: int, hint: str | None = None) -> UsageError:
        return UsageError(f"codec spec {self.text!r} at character {pos + 1}: {what}", hint=hint)

    def peek(self, k: int = 0) -> tuple[str, str, int]:
        return self.tokens[min(self.i + k, len(self.tokens) - 1)]

    def take(self, kind: str, value: str | None, expected: str) -> tuple[str, str, int]:
        tok = self.peek()
        if tok[0] != kind or (value is not None and tok[1] != value):
            found = "the end" if tok[0] == "end" else repr(tok[1])
            raise self.error(f"expected {expected}, found {found}", tok[2], _SYNTAX)
        self.i += 1
        return tok

    def spec(self, depth: int) -> _Call:
        if depth > MAX_DEPTH:
            raise self.error(f"specs nested more than {MAX_DEPTH} deep", self.peek()[2])
        _, name, pos = self.take("word", None, "a codec name")
        call = _Call(name, {}, pos)
        if self.peek()[1] != "(":
            return call
        self.i += 1
        if self.peek()[1] == ")":
            self.i += 1
            return call
        while True:
            _, key, kpos = self.take("word", None, "an option name")
            if key in call.args:
                raise self.error(f"{key} given twice", kpos)
            self.take("punct", "=", f"'=' after {key}")
            call.args[key] = kpos, self.value(depth)
            sep = self.take("punct", None, "',' or ')'")
            if sep[1] == ")":
                return call
            if sep[1] != ",":
                raise self.error(f"expected ',' or ')', found {sep[1]!r}", sep[2], _SYNTAX)

    def value(self, depth: int) -> _Call | _Word:
        if self.peek()[0] == "word" and self.peek(1)[1] == "(":
            return self.spec(depth + 1)
        _, text, pos = self.take("word", None, "a value")
        return _Word(text, pos)

    def end(self) -> None:
        tok = self.peek()
        if tok[0] != "end":
            raise self.error(f"unexpected {tok[1]!r} after the spec", tok[2], _SYNTAX)


def parse_spec(text: str) -> CodecSpec:
    """A spec from its string, strictly (see the module docstring).

    Example:
        >>> s = parse_spec("svd(rank=64, a=int4(group=32))")
        >>> s.rank, s.a, str(s)
        (64, Int4(group=32, symmetric=False, fit='mse', center=False), 'svd(rank=64,a=int4(group=32))')
        >>> parse_spec("int4(group=48)")
        Traceback (most recent call last):
        tolcli.errors.UsageError: codec spec 'int4(group=48)': int4 group size must be one of (32, 64, 128), got 48
    """
    p = _Parser(text)
    tree = p.spec(0)
    p.end()
    return _build(tree, p)


def _build(call: _Call, p: _Parser) -> CodecSpec:
    try:
        cls = spec_class(call.name)
    except UsageError as e:
        raise p.error(e.message, call.pos) from None
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, (kpos, node) in call.args.items():
        if key not in names:
            raise p.error(f"{call.name} has no option {key!r} (it has {', '.join(names) or 'none'})", kpos)
        kwargs[key] = _convert(hints[key], node, f"{call.name} {key}", p)
    try:
        return cls(**kwargs)
    except UsageError as e:
        raise UsageError(f"codec spec {p.text!r}: {e.message}", hint=e.hint) from None


def _convert(hint: Any, node: _Call | _Word, where: str, p: _Parser) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
    if isinstance(hint, type) and issubclass(hint, CodecSpec):
        return _build(node if isinstance(node, _Call) else _Call(node.text, {}, node.pos), p)
    kind, convert = _SCALARS[hint]
    if isinstance(node, _Call):
        raise p.error(f"{where} takes {kind}, not a codec spec", node.pos)
    value = convert(node.text)
    if value is None:
        raise p.error(f"{where} takes {kind}, got {node.text!r}", node.pos)
    return value


def _to_float(s: str) -> float | None:
    return float(s) if _FLOAT.fullmatch(s) and math.isfinite(float(s)) else None


_SCALARS: dict[Any, tuple[str, Any]] = {
    bool: ("true or false", lambda s: {"true": True, "false": False}.get(s.lower())),
    int: ("an integer", lambda s: int(s) if _INT.fullmatch(s) and len(s.lstrip("+-")) <= 20 else None),
    float: ("a number", _to_float),
    str: ("a word", lambda s: s),
}


# ---- formatting: spec -> text -----------------------------------------------------------------------------
def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, CodecSpec):
        return format_spec(v)
    return repr(v) if isinstance(v, float) else str(v)


def format_spec(spec: CodecSpec) -> str:
    """The canonical string of a spec: its non-default fields in order (``str(spec)`` calls this)."""
    args = [
        f"{f.name}={_format_value(getattr(spec, f.name))}" for f in fields(spec) if getattr(spec, f.name) != _default(f)
    ]
    return f"{spec.name}({','.join(args)})" if args else spec.name
