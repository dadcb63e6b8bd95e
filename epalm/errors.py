"""The errors a person can act on, and the progress callback, below every module that uses them.

Each module raises its own subclass; the CLI and the app catch `UserError` in one place and show its
message as is (anything else is a bug, shown with its type).
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]
"""Hears what a load is doing, for people: stages ("Loading the OPT-2.7B language model…") and downloads."""


class UserError(Exception):
    """A failure whose message is written for the person using the demo: what went wrong, what to do."""


class InputError(UserError, ValueError):
    """A request the user can fix: unknown task, missing or overlong question, bad settings."""


class WeightsUnavailable(UserError, RuntimeError):
    """A file or model could not be had (offline, missing, gated); the message says what to do.
    `not_cached`: a download was needed and could not happen (offline, or the Hub unreachable)."""

    def __init__(self, message: str, not_cached: bool = False) -> None:
        super().__init__(message)
        self.not_cached = not_cached


class AdapterError(UserError, ValueError):
    """An adapter file is unsafe, unreadable, or does not fit the task's models."""


def bounded(name: str, value: object, low: float, high: float, whole: bool = True) -> None:
    """Refuse a setting outside [low, high], or not a (whole) number: the one range check of every
    config, registry entry and request value, its message naming the setting (a ValueError: the
    caller says where the setting came from)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (whole and not isinstance(value, int)) or not low <= value <= high:  # NaN fails here too
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"{name} must be {kind} from {low:g} to {high:g}, not {value!r}")
