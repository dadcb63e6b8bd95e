"""Decoding presets: named rules over a task's own generation settings, the one list the library,
the CLI and the app offer. Light to import (no torch), so `--help` can show it at once."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .decoding import DecodingOptions


@dataclass(frozen=True)
class Preset:
    """A named rule over a task's own generation settings: the fields it sets replace the task's,
    every other field (length limits, minimum answer, seed) stays the task's."""

    label: str  # for people: what the preset does
    overrides: dict[str, Any] = field(default_factory=dict)

    def apply(self, options: DecodingOptions) -> DecodingOptions:
        return replace(options, **self.overrides)


PRESETS: dict[str, Preset] = {
    "paper": Preset("Paper: the task's settings (3 beams)"),
    "fast": Preset("Fast: greedy, streamed", {"num_beams": 1, "do_sample": False}),
    "sampling": Preset(
        "Sampling: temperature 0.7, top-p 0.9, streamed",
        {"num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9},
    ),
}
DEFAULT_PRESET = "paper"
