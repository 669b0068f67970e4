"""A named family of small objects (spheres, gain layouts, gain maps, tensor layouts).

Options arrive as names (``sphere="row"``) and are stored as names in
checkpoint headers; everything that computes works with the objects. A
``Kinds`` turns a name into its object in one place, with one error
message for an unknown name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

__all__ = ["Kinds", "check_choice"]

T = TypeVar("T")


def check_choice(
    what: str, value: object, choices: Sequence[object], where: str = "", extra: str = ""
) -> None:
    """Raise the one "unknown X" error unless ``value`` is one of ``choices``.

    Examples:
        >>> check_choice("scope", "fused", ("fused", "all"))
        >>> check_choice("scope", "some", ("fused", "all"), where="mdparam.clip_grad_norm_")
        Traceback (most recent call last):
        ...
        ValueError: mdparam.clip_grad_norm_: unknown scope='some'; choose one of ('fused', 'all')
    """
    try:
        if value in choices:
            return
    except (TypeError, RuntimeError):  # a value that cannot be compared is no choice
        pass
    prefix = f"{where}: " if where else ""
    raise ValueError(f"{prefix}unknown {what}={value!r}; choose one of {tuple(choices)}{extra}")


class Kinds(Generic[T]):
    """Objects of one family by name; ``kinds("row")`` (or ``kinds(obj)``) gives the object.

    Examples:
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
        check_choice(self.what, name_or_obj, self.names)
        return self._by_name[name_or_obj]  # type: ignore[index]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[T]:
        return iter(self._by_name.values())
