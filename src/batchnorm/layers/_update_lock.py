"""The lock a layer holds while a call steps its moving statistics."""

from __future__ import annotations

import _thread
from typing import Any


class UpdateLock(_thread.RLock):  # type: ignore[misc]
    """A re-entrant lock (the C one: entering it costs what ``threading.RLock``'s does) that a
    copy of the layer gets afresh, unlocked: ``copy.deepcopy`` and pickling make a new one.

    A layer parametrized by ``torch.nn.utils.parametrize`` is deep-copied member by member (its
    class's ``__deepcopy__`` copies ``__dict__``, past the layer's ``__getstate__``, which
    leaves the lock out): a plain ``RLock`` there failed with "cannot pickle '_thread.RLock'
    object", so ``copy.deepcopy``, ``fold`` and EMA copies of such a model failed."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> UpdateLock:
        return UpdateLock()

    def __reduce__(self) -> tuple[type[UpdateLock], tuple[()]]:
        return (UpdateLock, ())
