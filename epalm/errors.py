"""The errors a person can act on. Each module raises its own subclass; the CLI and the app catch
`UserError` in one place and show its message as is (anything else is a bug, shown with its type)."""

from __future__ import annotations


class UserError(Exception):
    """A failure whose message is written for the person using the demo: what went wrong, what to do."""


class InputError(UserError, ValueError):
    """A request the user can fix: unknown task, missing or overlong question, bad settings."""
