"""The one registry style: defenses, attacks, merge methods and hardening components.

A :class:`Registry` is a ``dict`` of name -> item (anything with a ``name``) in the order the
items were registered, with :meth:`Registry.register` to add one and
:meth:`Registry.lookup` to fetch one with a one-line error naming the choices.
"""

from __future__ import annotations

from typing import Any, TypeVar

from mergeshield.errors import MergeShieldError

T = TypeVar("T")


class Registry(dict[str, T]):
    """Items of one ``kind`` ("defense", "attack", ...) by name."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, item: T) -> T:
        """Add ``item`` under ``item.name`` (a name may be registered once); returns it."""
        name: Any = getattr(item, "name")  # noqa: B009 (any item with a name)
        if name in self:
            raise AssertionError(f"{self.kind} {name!r} registered twice")
        self[name] = item
        return item

    def lookup(self, name: str) -> T:
        """The item called ``name``; a :class:`MergeShieldError` naming the choices if none."""
        if name not in self:
            raise MergeShieldError(f"unknown {self.kind} {name!r}; choose from {', '.join(self)}")
        return self[name]
