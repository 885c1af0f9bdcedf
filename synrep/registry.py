"""Name -> factory registries (encoders, methods, datasets, ...), filled by decorators."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from synrep.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to factories (or other objects), filled with :meth:`register`.

    Example:
        >>> METHODS = Registry("method")
        >>> @METHODS.register("simclr")
        ... def build_simclr(cfg): ...
        >>> METHODS.get("simclr")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            key = name or getattr(fn, "__name__", None)
            if not key:
                raise ValueError(f"{self.kind}: register needs a name for {fn!r}")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = fn
            return fn

        return deco

    def add(self, name: str, item: T) -> T:
        """Register ``item`` (any object, e.g. a :class:`~synrep.stages.Stage`) under ``name``."""
        return self.register(name)(item)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            choices = ", ".join(sorted(self._items))
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {choices}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
