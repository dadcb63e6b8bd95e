"""epalm: run eP-ALM (ICCV 2023) on your own image, video clip or audio clip.

    from epalm import Pipeline
    pipe = Pipeline()                     # loads lazily; Pipeline(tiny=True) needs no download
    pipe.caption("cat.jpg", task="image-caption").text
    pipe.answer("cat.jpg", "What is the cat doing?", task="image-vqa").text
    for partial in pipe.stream("clip.mp4", "video-caption", preset="fast"):
        print(partial.text)
    pipe.caption("cat.jpg", task="image-caption", inspect=True).inspection  # what the model saw, how sure it was

    from epalm import train                # your own adapter, on a folder of examples
    train("my-photos/", base="image-caption", out="my-adapter")
    pipe.caption("cat.jpg", adapter="my-adapter").text

The names below are imported on first use, so `import epalm` (and `python -m epalm --help`) does
not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DEFAULT_PRESET": "presets",
    "PRESETS": "presets",
    "DecodingOptions": "decoding",
    "Preset": "presets",
    "InputError": "errors",
    "UserError": "errors",
    "AdapterError": "errors",
    "WeightsUnavailable": "errors",
    "Transfer": "errors",
    "Inspection": "inspection",
    "MediaError": "media",
    "MediaLimits": "media",
    "MAX_QUESTION_CHARS": "checks",
    "MAX_QUESTION_TOKENS": "checks",
    "Answer": "answers",
    "OutOfMemory": "pipeline",
    "Pipeline": "pipeline",
    "ServingConfig": "config",
    "Status": "answers",
    "answers": "answers",
    "Timings": "answers",
    "ModelSource": "store",
    "Task": "tasks",
    "load_registry": "tasks",
    "TrainConfig": "training",
    "train": "training",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and editors; `X as X` marks a re-export
    from .answers import Answer as Answer
    from .answers import Status as Status
    from .answers import Timings as Timings
    from .answers import answers as answers
    from .checks import MAX_QUESTION_CHARS as MAX_QUESTION_CHARS
    from .checks import MAX_QUESTION_TOKENS as MAX_QUESTION_TOKENS
    from .config import ServingConfig as ServingConfig
    from .decoding import DecodingOptions as DecodingOptions
    from .errors import AdapterError as AdapterError
    from .errors import InputError as InputError
    from .errors import Transfer as Transfer
    from .errors import UserError as UserError
    from .errors import WeightsUnavailable as WeightsUnavailable
    from .inspection import Inspection as Inspection
    from .media import MediaError as MediaError
    from .media import MediaLimits as MediaLimits
    from .pipeline import OutOfMemory as OutOfMemory
    from .pipeline import Pipeline as Pipeline
    from .presets import DEFAULT_PRESET as DEFAULT_PRESET
    from .presets import PRESETS as PRESETS
    from .presets import Preset as Preset
    from .store import ModelSource as ModelSource
    from .tasks import Task as Task
    from .tasks import load_registry as load_registry
    from .training import TrainConfig as TrainConfig
    from .training import train as train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
