"""epalm: run eP-ALM (ICCV 2023) on your own image, video clip or audio clip.

    from epalm import Pipeline
    pipe = Pipeline()                     # loads lazily; Pipeline(tiny=True) needs no download
    pipe.caption("cat.jpg", task="image-caption").text
    pipe.answer("cat.jpg", "What is the cat doing?", task="image-vqa").text
    for partial in pipe.stream("clip.mp4", "video-caption", preset="fast"):
        print(partial.text)
    pipe.caption("cat.jpg", task="image-caption", inspect=True).inspection  # what the model saw, how sure it was

The names below are imported on first use, so that `import epalm.media` or a command's `--help`
does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULT_PRESET": "decoding", "PRESETS": "decoding", "Preset": "decoding", "DecodingOptions": "decoding",
    "MAX_QUESTION_CHARS": "pipeline", "MAX_QUESTION_TOKENS": "pipeline", "InputError": "errors", "UserError": "errors",
    "AdapterError": "hub", "WeightsUnavailable": "hub", "Inspection": "inspection", "MediaError": "media",
    "MediaLimits": "media",
    "Answer": "pipeline", "OutOfMemory": "pipeline", "Pipeline": "pipeline", "Timings": "pipeline",
    "ModelSource": "store", "Task": "tasks", "load_registry": "tasks",
}
__all__ = [
    "DEFAULT_PRESET", "MAX_QUESTION_CHARS", "MAX_QUESTION_TOKENS", "PRESETS", "AdapterError", "Answer",
    "DecodingOptions", "Inspection", "InputError", "MediaError", "MediaLimits", "ModelSource", "OutOfMemory",
    "Pipeline", "Preset", "Task", "Timings", "UserError", "WeightsUnavailable", "load_registry",
]

if TYPE_CHECKING:
    from .decoding import DEFAULT_PRESET, PRESETS, DecodingOptions, Preset
    from .errors import InputError, UserError
    from .hub import AdapterError, WeightsUnavailable
    from .inspection import Inspection
    from .media import MediaError, MediaLimits
    from .pipeline import MAX_QUESTION_CHARS, MAX_QUESTION_TOKENS, Answer, OutOfMemory, Pipeline, Timings
    from .store import ModelSource
    from .tasks import Task, load_registry


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'epalm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
