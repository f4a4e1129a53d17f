"""Checks of setting values, shared by every constructor so that a rule is written once.

Numbers are refused when they are bools (``True`` is an ``int`` in Python), NaN or
infinite, and when they fall outside their range; each message names the setting, the
value and what would be accepted.
"""

from __future__ import annotations

import math
from typing import Any

from jest_stream.errors import SettingError, SettingTypeError

__all__ = ['check_int', 'check_number', 'check_choice', 'check_bool']


def check_int(value: Any, setting: str, *, low: int | None = None, high: int | None = None,
              hint: str = '') -> int:
    """``value`` as an int in ``[low, high]``.

    Args:
        value (Any): The setting's value.
        setting (str): Its name, for the message.
        low (int, optional): Smallest accepted value.
        high (int, optional): Largest accepted value.
        hint (str): Appended to the message (what the setting means, the usual fix).

    Returns:
        int: The value.

    Raises:
        SettingTypeError: ``value`` is not an int (bools are refused).
        SettingError: It is outside the range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingTypeError(f'{setting}={value!r} must be an int{_range(low, high)}'
                               f'{_hint(hint)}')
    if (low is not None and value < low) or (high is not None and value > high):
        raise SettingError(f'{setting}={value!r} must be an int{_range(low, high)}{_hint(hint)}')
    return int(value)


def check_number(value: Any, setting: str, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 hint: str = '') -> float:
    """``value`` as a finite float in the range ``[low, high]`` (ends open when asked).

    Args:
        value (Any): The setting's value (an int or a float).
        setting (str): Its name, for the message.
        low (float, optional): Lower end of the range.
        high (float, optional): Upper end of the range.
        low_open (bool): Exclude ``low`` itself.
        high_open (bool): Exclude ``high`` itself.
        hint (str): Appended to the message.

    Returns:
        float: The value.

    Raises:
        SettingTypeError: ``value`` is not a number (bools are refused).
        SettingError: It is NaN, infinite, or outside the range.
    """
    text = _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingTypeError(f'{setting}={value!r} must be a number{text}{_hint(hint)}')
    number = float(value)
    inside = math.isfinite(number) \
        and (low is None or (number > low if low_open else number >= low)) \
        and (high is None or (number < high if high_open else number <= high))
    if not inside:
        raise SettingError(f'{setting}={value!r} must be a finite number{text}{_hint(hint)}')
    return number


def check_choice(value: Any, setting: str, choices: Any) -> Any:
    """``value`` if it is one of ``choices``.

    Raises:
        SettingError: It is not; the message lists the choices.
    """
    valid = list(choices)
    if not isinstance(value, (str, int)) or isinstance(value, bool) or value not in valid:
        raise SettingError(f'{setting}={value!r} is not known; choose one of '
                           f'{", ".join(map(repr, valid))}')
    return value


def check_bool(value: Any, setting: str) -> bool:
    """``value`` if it is a bool.

    Raises:
        SettingTypeError: It is not.
    """
    if not isinstance(value, bool):
        raise SettingTypeError(f'{setting}={value!r} must be True or False')
    return value


def _range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f' from {low} to {high}'
    if low is not None:
        return f' >= {low}'
    if high is not None:
        return f' <= {high}'
    return ''


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ''
    if high is None:
        return f' {">" if low_open else ">="} {low:g}'
    if low is None:
        return f' {"<" if high_open else "<="} {high:g}'
    return f' in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'


def _hint(hint: str) -> str:
    return f' ({hint})' if hint else ''
