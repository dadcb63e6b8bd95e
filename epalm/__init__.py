"""epalm: run eP-ALM (ICCV 2023) on your own image, video clip or audio clip.

    from epalm import Pipeline
    pipe = Pipeline()                     # loads lazily; Pipeline(tiny=True) needs no download
    pipe.caption("cat.jpg", task="image-caption").text
    pipe.answer("cat.jpg", "What is the cat doing?", task="image-vqa").text
    for partial in pipe.stream("clip.mp4", "video-caption", preset="fast"):
        print(partial.text)

    from epalm import train                # your own adapter, on a folder of examples
    train("my-photos/", base="image-caption", out="my-adapter")
    pipe.caption("cat.jpg", adapter="my-adapter").text
"""

from .decoding import PRESETS, DecodingOptions
from .hub import AdapterError, WeightsUnavailable
from .media import MediaError, MediaLimits
from .pipeline import Answer, InputError, OutOfMemory, Pipeline, Timings
from .tasks import Task, load_registry
from .train import TrainConfig, train

__all__ = [
    "PRESETS", "AdapterError", "Answer", "DecodingOptions", "InputError", "MediaError", "MediaLimits",
    "OutOfMemory", "Pipeline", "Task", "Timings", "TrainConfig", "WeightsUnavailable", "load_registry", "train",
]
