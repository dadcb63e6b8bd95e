"""The errors a person can act on, and the progress callback, below every module that uses them.

Each module raises its own subclass; the CLI and the app catch `UserError` in one place and show its
message as is (anything else is a bug, shown with its type). A message says what went wrong and what the
person can do; what only the machine's owner can use (a cache folder, a server's setting, a command to run
there) is the error's `detail`, which the CLI prints under the message and an app writes to its log.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]
"""Hears what a load is doing, for people: stages ("Loading the OPT-2.7B language model…") and downloads
(`Transfer` reports, each of a file's bytes so far). It is called from the loading thread and should
return at once (e.g. put the report on a queue)."""


class Transfer(str):
    """A download's progress, as a report a `Progress` hears: its text is for people ("Downloading
    pytorch_model.bin in facebook/opt-2.7b: 1.0 GB of 5.3 GB (20%), 98 MB/s, about 44 s left"); the
    numbers are for code, which keeps the latest instead of every one (`rate`: bytes per second, and
    `left_s`, None until known)."""

    done: int
    total: int
    rate: float | None
    left_s: float | None

    def __new__(cls, text: str, done: int, total: int, rate: float | None, left_s: float | None) -> Transfer:
        report = super().__new__(cls, text)
        report.done, report.total, report.rate, report.left_s = done, total, rate, left_s
        return report

    def __getnewargs__(self) -> tuple:  # a copy or a pickle keeps the numbers
        return str(self), self.done, self.total, self.rate, self.left_s


class UserError(Exception):
    """A failure whose message is written for the person using the demo: what went wrong, what to do.
    `detail`: what only the machine's owner can use (paths, settings, commands), kept out of the message."""

    def __init__(self, *args: object, detail: str = "") -> None:
        super().__init__(*args)
        self.detail = detail

    def __reduce__(self) -> tuple:  # pickled (a Ray worker's failure) with its detail and other fields
        return type(self), self.args, self.__dict__


class InputError(UserError, ValueError):
    """A request the user can fix: unknown task, missing or overlong question, bad settings."""


class WeightsUnavailable(UserError, RuntimeError):
    """A file or model could not be had (offline, missing, gated); the message says what to do.
    `not_cached`: a download was needed and could not happen (offline, or the Hub unreachable)."""

    def __init__(self, message: str, not_cached: bool = False, detail: str = "") -> None:
        super().__init__(message, detail=detail)
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
