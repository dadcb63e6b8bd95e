"""epalm: run eP-ALM (ICCV 2023) on your own image, video clip or audio clip.

    from epalm import Pipeline
    pipe = Pipeline()                     # loads lazily; Pipeline(tiny=True) needs no download
    pipe.caption("cat.jpg", task="image-caption").text
    pipe.answer("cat.jpg", "What is the cat doing?", task="image-vqa").text
    for partial in pipe.stream("clip.mp4", "video-caption", preset="fast"):
        print(partial.text)
    pipe.caption("cat.jpg", task="image-caption", inspect=True).inspection  # what the model saw, how sure it was
"""

from .decoding import DEFAULT_PRESET, PRESETS, DecodingOptions, Preset
from .errors import InputError, UserError
from .hub import AdapterError, WeightsUnavailable
from .inspection import Inspection
from .media import MediaError, MediaLimits
from .pipeline import MAX_QUESTION_CHARS, MAX_QUESTION_TOKENS, Answer, OutOfMemory, Pipeline, Timings
from .store import ModelSource
from .tasks import Task, load_registry

__all__ = [
    "DEFAULT_PRESET", "MAX_QUESTION_CHARS", "MAX_QUESTION_TOKENS", "PRESETS", "AdapterError", "Answer",
    "DecodingOptions", "InputError", "Inspection", "MediaError", "MediaLimits", "ModelSource", "OutOfMemory",
    "Pipeline", "Preset", "Task", "Timings", "UserError", "WeightsUnavailable", "load_registry",
]
