"""Untrusted input, read safely: ONE hardened JSON loader, and the file checks every reader makes first.

Every JSON document tolcli reads from a file a user hands it goes through :func:`loads` (or :func:`load_file`):
bundle manifests, safetensors headers, shard and checkpoint indexes, ``config.json``, tensor maps and ``.jsonl``
lines. It returns plain data (dicts, lists, str, int, float, bool, None) or raises an
:class:`~tolcli.errors.InputError` naming the file and the position. Refused, before or while parsing:

- a document larger than ``max_bytes``, or nested deeper than ``max_depth`` (checked before parsing, so no
  ``RecursionError`` and no parse of a huge document);
- ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON), and numbers that overflow a float (``1e999``);
- integer literals of more than :data:`MAX_INT_DIGITS` digits (Python would spend quadratic time on 4,300+ digits,
  then raise a ``ValueError``);
- an object with a repeated key (which one wins differs between parsers);
- bytes that are not UTF-8.

:func:`short` is how a message quotes a value from such a document: its ``repr``, cut to a sane length, so that an
error stays one readable line whatever the input holds.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from tolcli.errors import InputError

MAX_INT_DIGITS = 20  # 2^64 has 20 digits: every integer a bundle or config can meaningfully hold
MAX_DEPTH = 64  # real documents nest < 10 deep
MAX_JSON_BYTES = 64 << 20
MAX_MESSAGE_VALUE = 300  # characters of a quoted value in a message

# A JSON string (the unrolled-loop form), or one of the tokens refused after parsing. An unterminated string runs to
# the end of the text, so the regex never retries it from each later quote (linear time on '"' followed by many
# '\\"': the pattern without that ending took a minute on 40 kB).
_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)'
_TOKEN = re.compile(_STRING + r"|(?P<tok>-?Infinity|NaN|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)", re.DOTALL)
_STRINGS = re.compile(_STRING, re.DOTALL)
_KEEP_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


class _Refused(ValueError):
    """Raised by the parser hooks; turned into an InputError with a position."""


def short(value: Any, limit: int = MAX_MESSAGE_VALUE) -> str:
    """``repr(value)``, cut to at most ``limit`` characters (a message quotes untrusted values with this).

    Example:
        >>> short("abc"), short(list(range(100)), 20)
        ("'abc'", '[0, 1, 2, 3, 4, 5...')
    """
    text = repr(value)
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def cut(text: str, limit: int = MAX_MESSAGE_VALUE) -> str:
    """``text`` itself (no quotes), cut to at most ``limit`` characters."""
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def _position(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line} column {col}"


def nesting_depth(text: str) -> int:
    """The deepest nesting of ``[]``/``{}`` outside strings (linear time, no recursion)."""
    skeleton = _STRINGS.sub("", text).encode("utf-8", "surrogatepass").translate(None, _KEEP_BRACKETS)
    if not skeleton:
        return 0
    arr = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.where((arr == ord("[")) | (arr == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def _refused(token: str) -> bool:
    """Whether a number token is one the parser hooks refuse (to find its position for the message)."""
    if token.lstrip("-") in ("Infinity", "NaN"):
        return True
    if token.lstrip("-").isdigit():
        return len(token.lstrip("-")) > MAX_INT_DIGITS
    return float(token) in (float("inf"), float("-inf"))


def _parse_int(s: str) -> int:
    if len(s) - (s[0] == "-") > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(s) - (s[0] == '-'):,} digits (limit {MAX_INT_DIGITS})")
    return int(s)


def _parse_float(s: str) -> float:
    v = float(s)
    if v in (float("inf"), float("-inf")):
        raise _Refused(f"the number {short(s, 40)} overflows a float")
    return v


def _parse_constant(s: str) -> Any:
    raise _Refused(f"{s} is not JSON (no NaN or Infinity)")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Refused(f"key {short(k, 80)} appears twice in one object")
            seen.add(k)
    return out


def loads(
    text: str | bytes,
    *,
    path: str | Path | None = None,
    what: str | None = None,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_DEPTH,
    error: type[InputError] = InputError,
) -> Any:
    """Parse untrusted JSON strictly (see the module docstring); ``what`` prefixes the message
    (``"corrupted safetensors header"``), ``path`` names the file, ``error`` is the class raised.

    Example:
        >>> loads('{"a": [1, 2.5, null]}')
        {'a': [1, 2.5, None]}
        >>> loads('{"a": NaN}', what="manifest")
        Traceback (most recent call last):
        tolcli.errors.InputError: manifest: NaN is not JSON (no NaN or Infinity) at line 1 column 7
    """

    def fail(detail: str) -> InputError:
        return error(f"{what}: {detail}" if what else detail, path=path)

    if len(text) > max_bytes:
        raise fail(f"{len(text):,} bytes of JSON (limit {max_bytes:,})")
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise fail(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if text.count("[") + text.count("{") > max_depth:  # an upper bound on the depth: most texts skip the scan
        depth = nesting_depth(text)
        if depth > max_depth:
            raise fail(f"JSON nested {depth} levels deep (limit {max_depth})")
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
            object_pairs_hook=_pairs,
        )
    except json.JSONDecodeError as e:
        raise fail(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except _Refused as e:
        m = next((m for m in _TOKEN.finditer(text) if m.group("tok") and _refused(m.group("tok"))), None)
        where = f" at {_position(text, m.start('tok'))}" if m is not None else ""
        raise fail(f"{e}{where}") from None
    except (RecursionError, ValueError) as e:  # pragma: no cover - the checks above come first
        raise fail(f"invalid JSON ({short(str(e), 120)})") from None


# ---- files ---------------------------------------------------------------------------------------------------
def regular_file(path: str | Path, *, what: str = "file", error: type[InputError] = InputError) -> os.stat_result:
    """``os.stat`` of ``path`` (following links), refusing anything but a regular file before it is opened: a FIFO
    or a device would block a reader or never end."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} not found", path=_printable(path)) from None
    except OSError as e:
        raise error(f"cannot read {what}: {e.strerror}", path=_printable(path)) from None
    except ValueError as e:  # a NUL byte or an unencodable character in the name
        raise error(f"{what} has an impossible file name ({cut(str(e), 80)})", path=_printable(path)) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "special"
        raise error(f"{what} is {kind}, not a regular file", path=path)
    return st


def inside(path: str | Path, root: str | Path, *, what: str = "file", error: type[InputError] = InputError) -> Path:
    """``path`` resolved (every symlink followed), refused unless it stays inside directory ``root``: a link out of
    a checkpoint or bundle directory (to ``~/.ssh/id_rsa``, say) is never read."""
    try:
        real = Path(os.path.realpath(path))
        base = Path(os.path.realpath(root))
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, an unencodable character
        raise error(
            f"cannot resolve {what} {short(Path(path).name, 80)} ({cut(str(e), 80)})", path=_printable(root)
        ) from None
    if real != base and base not in real.parents:
        raise error(
            f"{what} {Path(path).name} is a link that leaves its directory (to {short(str(real), 120)})",
            path=path,
            hint="copy the file into the directory instead of linking to it",
        )
    return real


def plain_file_name(name: Any) -> bool:
    """Whether ``name`` (from an untrusted index) is a plain file name: no directory part, not ``.``/``..``, no NUL,
    encodable, at most 255 bytes. Anything else is refused before it reaches the file system."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\x00"):
        return False
    try:
        return len(name.encode("utf-8")) <= 255
    except UnicodeEncodeError:
        return False


def _printable(path: str | Path) -> str:
    """A path for a message: cut, and with characters that cannot be printed escaped."""
    text = str(path).encode("utf-8", "backslashreplace").decode("utf-8")
    return cut(text, 300)


def read_bytes(path: str | Path, *, max_bytes: int, what: str = "file", error: type[InputError] = InputError) -> bytes:
    """A regular file's bytes, refused when larger than ``max_bytes`` (checked before and while reading)."""
    st = regular_file(path, what=what, error=error)
    if st.st_size > max_bytes:
        raise error(f"{what} has {st.st_size:,} bytes (limit {max_bytes:,})", path=path)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"cannot read {what}: {e.strerror}", path=path) from None
    if len(raw) > max_bytes:
        raise error(f"{what} grew beyond {max_bytes:,} bytes while it was read", path=path)
    return raw


def load_file(
    path: str | Path,
    *,
    what: str | None = None,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_DEPTH,
    error: type[InputError] = InputError,
    label: str = "JSON file",
) -> Any:
    """:func:`loads` of a regular file of at most ``max_bytes`` (``label`` names it in "not found" messages)."""
    raw = read_bytes(path, max_bytes=max_bytes, what=label, error=error)
    return loads(raw, path=path, what=what, max_bytes=max_bytes, max_depth=max_depth, error=error)
