"""The report ``load_weights`` returns: what loaded where, and what did not match."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, NamedTuple

from batchnorm.interop.keras._compare import Difference

Status = Literal["loaded", "skipped", "no module", "not in file", "unused"]


class LayerLoad(NamedTuple):
    """What happened to one file layer or one module: ``(keras_name, module_name, status, differences)``.

    ``status`` is "loaded", "skipped" (the weights do not fit), "no module" (a file layer with
    no module left to take it), "not in file" (a module with no file layer) or "unused" (a file
    layer an explicit mapping leaves out). ``keras_name`` is the layer's path in the file's
    model (``"encoder/bn"`` for a layer of a nested model; its name otherwise). ``differences``
    are those left after configuring;
    ``notes`` say what was configured or could not be checked.
    """

    keras_name: str | None
    module_name: str | None
    status: Status
    differences: tuple[Difference, ...]
    notes: tuple[str, ...] = ()


class LoadReport:
    """The outcome of :func:`load_weights`, one :class:`LayerLoad` per pair, in file order."""

    def __init__(self, path: str, entries: list[LayerLoad]) -> None:
        self.path = path
        self.entries = tuple(entries)

    def __iter__(self) -> Iterator[LayerLoad]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> LayerLoad:
        return self.entries[index]

    @property
    def mismatches(self) -> list[str]:
        """Every problem, one line each: differences and layers left without a partner."""
        lines = []
        for entry in self.entries:
            pair = f"{entry.keras_name} -> {shown(entry.module_name)}"
            if entry.status == "no module":
                lines.append(f"{pair}: no batch-norm module left in the model for this file layer")
            elif entry.status == "not in file":
                lines.append(f"{pair}: no file layer left for this module")
            lines += [f"{pair}: {difference}" for difference in entry.differences]
        return lines

    @property
    def ok(self) -> bool:
        """True when every file layer loaded into a module that matches it in every setting."""
        return not self.mismatches and all(e.status in ("loaded", "unused") for e in self.entries)

    def __str__(self) -> str:
        lines = [f"load_weights from {self.path}:"]
        for entry in self.entries:
            lines.append(f"  {entry.keras_name} -> {shown(entry.module_name)}: {entry.status}")
            lines += [f"    - {difference}" for difference in entry.differences]
            lines += [f"    note: {note}" for note in entry.notes]
        return "\n".join(lines)

    __repr__ = __str__


def shown(module_name: str | None) -> str:
    if module_name is None:
        return "(none)"
    return module_name or "(the model itself)"
