"""Help text in the conventional (click, GNU) form, whatever the installed typer prints by default.

typer 0.2x labels every value with its Python type in angle brackets (``--rank <int>``, ``--quiet <bool>``) and
writes a required argument as ``{bundle}`` in the usage line. The convention users know from click, git and GNU
tools is ``--rank INTEGER``, a flag with no value label, and ``BUNDLE`` / ``[OUT]`` for arguments. :func:`install`
adjusts typer's parameter classes once, before any help is printed; on a typer without these classes (older
releases, which print the conventional form already) it does nothing. An explicit ``metavar=`` always wins.
"""

from __future__ import annotations

import re
from typing import Any

_NAMES = {
    "int": "INTEGER",
    "int range": "INTEGER",
    "float": "FLOAT",
    "float range": "FLOAT",
    "str": "TEXT",
    "bool": "BOOLEAN",
    "path": "PATH",
    "file": "FILE",
    "directory": "DIRECTORY",
    "datetime": "DATETIME",
}
_ANGLE = re.compile(r"^<(?P<label>.*)>(?P<rest>(\.\.\.)?)$")


def conventional(label: str | None) -> str | None:
    """``<int>`` -> ``INTEGER``, ``<a|b>`` -> ``[a|b]``, ``<list[str]>`` -> ``TEXT...``; other labels unchanged."""
    if not label:
        return label
    m = _ANGLE.match(label)
    if m is None:
        return label
    inner, rest = m.group("label"), m.group("rest")
    listed = re.fullmatch(r"list\[(.*)\]", inner)
    if listed:
        inner, rest = listed.group(1), "..."
    if "|" in inner:
        return f"[{inner}]{rest}"
    return _NAMES.get(inner, inner.upper()) + rest


def install() -> None:
    """Patch typer's option and argument classes (idempotent)."""
    try:
        from typer.core import TyperArgument, TyperOption
    except ImportError:  # pragma: no cover - typer without these classes
        return
    if getattr(TyperOption, "_tolcli_help", False):
        return
    if hasattr(TyperOption, "display_type_rich"):
        option_type = TyperOption.display_type_rich

        def option_display(self: Any, ctx: Any) -> str | None:
            if self.metavar is not None:
                return str(self.metavar)
            if getattr(self, "is_flag", False) or getattr(self, "count", False):
                return None  # a flag takes no value: nothing to label
            return conventional(option_type(self, ctx))

        TyperOption.display_type_rich = option_display  # type: ignore[method-assign]
    if hasattr(TyperArgument, "_usage_display_name") and hasattr(TyperArgument, "_rich_display_name"):

        def argument_name(self: Any) -> str:
            return str(self.metavar) if self.metavar is not None else str(self.name).upper()

        def usage_name(self: Any) -> str:
            name = argument_name(self)
            if self.metavar is None:  # an explicit metavar says itself whether it is optional
                name = name if self.required else f"[{name}]"
            return name + ("..." if self.nargs != 1 else "")

        def rich_name(self: Any) -> str:
            return argument_name(self) + ("..." if self.metavar is None and self.nargs != 1 else "")

        TyperArgument._usage_display_name = usage_name  # type: ignore[method-assign]
        TyperArgument._rich_display_name = rich_name  # type: ignore[method-assign]
        if isinstance(getattr(TyperArgument, "display_name_raw", None), property):  # the arguments table, errors
            TyperArgument.display_name_raw = property(argument_name)  # type: ignore[method-assign,assignment]
        if hasattr(TyperArgument, "display_type_rich"):
            TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]
    TyperOption._tolcli_help = True  # type: ignore[attr-defined]
