"""The types of the settings in a Keras file's layer config, checked before they are compared.

Keras writes momentum and epsilon as numbers, axis as an int or a list of ints, trainable,
center, scale and renorm as booleans. A hand-edited or damaged config may hold ``null``,
``"0.5"`` or ``true`` there instead: compared with a module's setting, such a value raised a
bare TypeError (``"axis": null``), or was taken for a number (``"momentum": true`` configured a
torch module with momentum 0.0, whose running statistics then never moved). Every such value is
refused the same way whatever module it would load into, with or without ``configure``; whether
a number is in range is checked only where it is taken (``configure=True``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

from batchnorm.interop.keras._records import KerasBatchNormLayer


def _number(value: Any) -> bool:
    # JSON has no NaN or inf, but Python's json module reads them: they are numbers, out of range.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _axis(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(_integer(a) for a in value)
    return _integer(value)


_EXPECTED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "momentum": ("a number", _number),
    "epsilon": ("a number", _number),
    "renorm_momentum": ("a number", _number),
    "axis": ("an int or a non-empty list of ints", _axis),
    "trainable": ("true or false", lambda value: isinstance(value, bool)),
    "center": ("true or false", lambda value: isinstance(value, bool)),
    "scale": ("true or false", lambda value: isinstance(value, bool)),
    "renorm": ("true or false", lambda value: isinstance(value, bool)),
    "synchronized": ("true or false", lambda value: isinstance(value, bool)),
    "virtual_batch_size": ("an int or null", lambda value: value is None or _integer(value)),
    "renorm_clipping": (
        "a JSON object or null",
        lambda value: value is None or isinstance(value, Mapping),
    ),
}


def check_config_values(record: KerasBatchNormLayer, path: str) -> None:
    """Raise ValueError, naming the layer, the key and the value, where the layer's config holds
    a setting of another type than Keras writes (a key it does not hold is Keras' default)."""
    config = record.config
    if config is None:
        return
    for key, (expected, valid) in _EXPECTED.items():
        if key in config and not valid(config[key]):
            raise ValueError(
                f"Keras layer {record.path!r} in the file has an invalid setting: `{key}` must "
                f"be {expected}, as Keras writes it. Received: {key}={config[key]!r} in "
                f"path={path!r}"
            )
