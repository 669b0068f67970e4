"""A named family of small objects (spheres, gain layouts, gain maps, tensor layouts).

Options arrive as names (``sphere="row"``) and are stored as names in
checkpoint headers; everything that computes works with the objects. A
:class:`Kinds` turns a name into its object in one place, with one error
message for an unknown name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["Kinds"]

T = TypeVar("T")


class Kinds(Generic[T]):
    """Objects of one family by name; ``kinds("row")`` (or ``kinds(obj)``) gives the object.

    Example:
        >>> class Colour:
        ...     def __init__(self, name): self.name = name
        >>> colours = Kinds("colour", Colour)
        >>> red = colours.add(Colour("red"))
        >>> colours("red") is red, colours(red) is red, colours.names
        (True, True, ('red',))
        >>> colours("blue")
        Traceback (most recent call last):
        ...
        ValueError: unknown colour='blue'; choose one of ('red',)
    """

    def __init__(self, what: str, base: type) -> None:
        self.what = what
        self.base = base
        self._by_name: dict[str, T] = {}

    def add(self, obj: T) -> T:
        self._by_name[obj.name] = obj  # type: ignore[attr-defined]
        return obj

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def __call__(self, name_or_obj: str | T) -> T:
        if isinstance(name_or_obj, self.base):
            return name_or_obj  # type: ignore[return-value]
        try:
            return self._by_name[name_or_obj]  # type: ignore[index]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.what}={name_or_obj!r}; choose one of {self.names}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[T]:
        return iter(self._by_name.values())
