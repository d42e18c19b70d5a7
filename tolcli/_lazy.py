"""Modules imported on first use, so that commands which need neither torch nor h5py (``--version``,
``--help``, ``schema``) never load them. Used by the CLI; the library imports normally."""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands for module ``name`` and imports it on the first attribute access. Unlike
    :class:`importlib.util.LazyLoader` it never sits in ``sys.modules`` half-loaded, so code that walks
    ``sys.modules`` (``inspect``, ``pickle``) cannot trigger an import in the middle of another one."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_import(name: str) -> Any:
    """A stand-in for module ``name``, imported on its first attribute access.

    Example:
        >>> m = lazy_import("tolcli.transport")
        >>> callable(m.pack)
        True
    """
    return LazyModule(name)
