"""Resolution of Keras-style object identifiers: a name, a ``{"class_name", "config"}`` dict, or a callable.

Initializers, regularizers and constraints share one lookup rule, the one tf-keras' ``get`` functions use:

- ``None`` stays ``None``;
- a string is a registered name (``"l2"``, ``"non_neg"``, ``"Zeros"``) built with default arguments;
- a dict ``{"class_name": ..., "config": {...}}`` (tf-keras and Keras 3 also write ``"module"`` and
  ``"registered_name"``, which are ignored) builds the named class from its config;
- any other callable is used as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class KerasObject:
    """Base of the built-in initializers, regularizers and constraints: a config round trip."""

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls: type[T], config: Mapping[str, Any]) -> T:
        return cls(**config)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self)))


def _normalise_name(name: str) -> str:
    return name.replace("_", "").lower()


def resolve(
    identifier: Any,
    registry: Mapping[str, type[KerasObject]],
    *,
    kind: str,
    argument: str,
) -> Any:
    """Turn ``identifier`` into a callable object, or raise an error that names ``argument``.

    Names match case-insensitively and with or without underscores, so ``"l1_l2"``, ``"L1L2"``,
    ``"non_neg"`` and ``"NonNeg"`` all resolve, as they do in tf-keras.
    """
    if identifier is None:
        return None
    lookup = {_normalise_name(name): cls for name, cls in registry.items()}
    known = ", ".join(sorted(registry))
    if isinstance(identifier, str):
        cls = lookup.get(_normalise_name(identifier))
        if cls is None:
            raise ValueError(
                f"Unknown {kind} name for `{argument}`; expected one of: {known}. "
                f"Received: {argument}={identifier!r}"
            )
        return cls()
    if isinstance(identifier, Mapping):
        if "class_name" not in identifier:
            raise ValueError(
                f"A {kind} dict for `{argument}` needs a 'class_name' key. "
                f"Received: {argument}={dict(identifier)!r}"
            )
        cls = lookup.get(_normalise_name(str(identifier["class_name"])))
        if cls is None:
            raise ValueError(
                f"Unknown {kind} class for `{argument}`; expected one of: {known}. "
                f"Received: {argument}={dict(identifier)!r}"
            )
        config = dict(identifier.get("config") or {})
        try:
            return cls.from_config(config)
        except TypeError as error:
            raise ValueError(
                f"Invalid config for {kind} {cls.__name__} in `{argument}`: {error}. "
                f"Received: {argument}={dict(identifier)!r}"
            ) from error
    if callable(identifier):
        return identifier  # type: ignore[no-any-return]
    raise TypeError(
        f"`{argument}` must be a {kind} name, a Keras config dict or a callable. "
        f"Received: {argument}={identifier!r} of type {type(identifier).__name__}"
    )


def serialize(obj: Any, *, module: str) -> Any:
    """The Keras dict of a built-in object, ``None`` for ``None``, and the object itself otherwise.

    Objects that are neither built in nor expose ``get_config`` cannot be written to JSON; they are
    returned unchanged so that ``get_config`` still works in memory, as tf-keras does for lambdas.
    """
    if obj is None:
        return None
    if hasattr(obj, "get_config"):
        return {
            "module": module,
            "class_name": type(obj).__name__,
            "config": obj.get_config(),
            "registered_name": None,
        }
    return obj
