"""epalm: run eP-ALM (ICCV 2023) on your own image, video clip or audio clip.

    from epalm import Pipeline
    pipe = Pipeline()                     # loads lazily; Pipeline(tiny=True) needs no download
    pipe.caption("cat.jpg", task="image-caption").text
    pipe.answer("cat.jpg", "What is the cat doing?", task="image-vqa").text
    for partial in pipe.stream("clip.mp4", "video-caption", preset="fast"):
        print(partial.text)
"""

from .decoding import PRESETS, DecodingOptions
from .errors import InputError, UserError
from .hub import AdapterError, WeightsUnavailable
from .media import MediaError, MediaLimits
from .pipeline import Answer, OutOfMemory, Pipeline, Timings
from .store import ModelSource
from .tasks import Task, load_registry

__all__ = [
    "PRESETS", "AdapterError", "Answer", "DecodingOptions", "InputError", "MediaError", "MediaLimits",
    "ModelSource", "OutOfMemory", "Pipeline", "Task", "Timings", "UserError", "WeightsUnavailable", "load_registry",
]
