"""On/off switches as they arrive from JSON configs and from the command line.

``python -m monai.bundle run ... --resume false`` hands the component the *string* ``'false'``
(the command line parses only Python literals, so ``False`` is a bool but ``false`` is not), and
``bool('false')`` is ``True``: the switch would silently do the opposite of what was asked. Every
component that takes an on/off key reads it through :func:`as_flag`, which accepts the spellings a
user types and refuses anything else with the key's name. Hand-written because neither MONAI's
config parser nor its command line converts these spellings.
"""

from __future__ import annotations

from typing import Any

__all__ = ["as_flag"]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0", "none", "null", ""}


def as_flag(value: Any, name: str) -> bool:
    """``value`` as a bool: True/False, 0/1, None, or the strings true/false, yes/no, on/off, 1/0.

    Args:
        value: the configured value (bool, int 0/1, None, or one of the strings above, any case).
        name: the config key, named in the error.

    Raises:
        ValueError: any other value (e.g. ``'flase'`` or ``2``), naming ``name`` and the value.
    """
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError(f"{name} must be true or false (also yes/no, on/off, 1/0), got {value!r}")
