"""Equality and repr for the parser's plain value classes (:class:`~proxy_runtime.sip.uri.SipUri`,
:class:`~proxy_runtime.sip.grammar.Via`, :class:`~proxy_runtime.sip.grammar.NameAddr`).

They are plain classes rather than dataclasses because mypyc compiles a plain class's ``__init__``
and leaves a dataclass's interpreted (one or more of each per message); these two helpers give them
back what the dataclass generated, from the names in their ``__slots__``. Neither is on the call
path (tests and logs compare and print values)."""

from __future__ import annotations

from collections.abc import Sequence


def fields_equal(a: object, b: object, names: Sequence[str]) -> bool:
    """Whether ``a`` and ``b`` hold equal values in every one of ``names``."""
    return all(getattr(a, n) == getattr(b, n) for n in names)


def fields_repr(obj: object, names: Sequence[str]) -> str:
    """``Name(field=value, ...)`` as a dataclass prints it."""
    inner = ", ".join(f"{n}={getattr(obj, n)!r}" for n in names)
    return f"{type(obj).__name__}({inner})"
