"""epalm: run eP-ALM (ICCV 2023) on your own image, video clip or audio clip.

    from epalm import Pipeline
    pipe = Pipeline()                     # loads lazily; Pipeline(tiny=True) needs no download
    pipe.caption("cat.jpg", task="image-caption").text
    pipe.answer("cat.jpg", "What is the cat doing?", task="image-vqa").text
    for partial in pipe.stream("clip.mp4", "video-caption", preset="fast"):
        print(partial.text)

The names below are imported on first use, so `import epalm` (and `python -m epalm --help`) does
not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "PRESETS": "decoding",
    "DecodingOptions": "decoding",
    "AdapterError": "hub",
    "WeightsUnavailable": "hub",
    "MediaError": "media",
    "MediaLimits": "media",
    "Answer": "pipeline",
    "InputError": "pipeline",
    "OutOfMemory": "pipeline",
    "Pipeline": "pipeline",
    "Timings": "pipeline",
    "Task": "tasks",
    "load_registry": "tasks",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and editors; `X as X` marks a re-export
    from .decoding import PRESETS as PRESETS
    from .decoding import DecodingOptions as DecodingOptions
    from .hub import AdapterError as AdapterError
    from .hub import WeightsUnavailable as WeightsUnavailable
    from .media import MediaError as MediaError
    from .media import MediaLimits as MediaLimits
    from .pipeline import Answer as Answer
    from .pipeline import InputError as InputError
    from .pipeline import OutOfMemory as OutOfMemory
    from .pipeline import Pipeline as Pipeline
    from .pipeline import Timings as Timings
    from .tasks import Task as Task
    from .tasks import load_registry as load_registry


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
