"""How the app serves: every setting with its flag, its environment variable and its default, read and
checked in one place (`ServingConfig.parse`), used by the app and by `Pipeline`.

Light to import (no torch, no gradio), so that `python app.py --help` and a bad flag answer at once.
A flag given on the command line wins over its environment variable (for Hugging Face Spaces), which
wins over the default stated here.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from .errors import InputError, bounded
from .media import MediaLimits

MAX_BATCH_ROWS = 24  # rows per decode step by default: eight paper (3-beam) requests
FEATURE_CACHE = 64  # inputs whose encoder features are kept (6 x 768 floats each at the OPT-2.7B shape)
QUEUE_SIZE = 32  # requests waiting for a place before the app says "busy"
_LIMITS = MediaLimits()
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Setting:
    """One setting: its flag (`--name`), environment variable and help (the default is the field's)."""

    env: str
    help: str
    kind: type = str  # str, int, float, bool, or list (of words)
    flag: str = ""  # another flag name than the field's ("--no-batching" for batching)
    bounds: tuple[float, float] | None = None  # a number's range


SETTINGS = {
    "device": Setting("EPALM_DEVICE", "cpu, cuda, cuda:N or auto"),
    "dtype": Setting("EPALM_DTYPE", "float32, bfloat16, float16 or auto (float16 on GPU, float32 on CPU)"),
    "tiny": Setting("EPALM_TINY", "tiny random models, no network (answers are meaningless)", bool),
    "host": Setting("GRADIO_SERVER_NAME", "address to serve on"),
    "port": Setting("GRADIO_SERVER_PORT", "port to serve on", int, bounds=(1, 65535)),
    "share": Setting("EPALM_SHARE", "a public gradio.live link", bool),
    "allow_local_adapters": Setting(
        "EPALM_ALLOW_LOCAL_ADAPTERS",
        "the Adapter field also takes adapter folders on this machine, not only Hub repo ids; for an app "
        "only you can reach",
        bool,
    ),
    "preload": Setting(
        "EPALM_PRELOAD",
        "tasks to load at start-up, in the background (default: the first tab's first task; none: `--preload` "
        "alone or EPALM_PRELOAD='')",
        list,
    ),
    "max_file_size": Setting("EPALM_MAX_FILE_SIZE", "upload limit in MiB", float, bounds=(0.001, 1e6)),
    "max_duration": Setting("EPALM_MAX_DURATION", "longest video or audio clip, in seconds", float, bounds=(0.1, 1e6)),
    "concurrency": Setting(
        "EPALM_CONCURRENCY",
        "requests served at once (0: the rows limit when batching, else 1 on CPU, 2 on GPU)",
        int,
        bounds=(0, 1024),
    ),
    "queue_size": Setting("EPALM_QUEUE_SIZE", "waiting requests before 'busy'", int, bounds=(1, 100_000)),
    "batching": Setting(
        "EPALM_BATCHING", "decode each request alone instead of sharing steps with the others", bool, "--no-batching"
    ),
    "max_batch_rows": Setting(
        "EPALM_MAX_BATCH_ROWS", "rows decoded together in one step (3 per 3-beam answer)", int, bounds=(1, 4096)
    ),
    "feature_cache": Setting(
        "EPALM_FEATURE_CACHE", "inputs whose encoder features are kept (0: none)", int, bounds=(0, 1_000_000)
    ),
}


@dataclass(frozen=True)
class ServingConfig:
    """The serving settings (see `SETTINGS` for each one's flag and variable); checked when made."""

    device: str = "auto"
    dtype: str = "auto"
    tiny: bool = False
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    allow_local_adapters: bool = False
    preload: tuple[str, ...] | None = None  # None: the page's first task
    max_file_size: float = _LIMITS.max_file_bytes / 2**20  # MiB
    max_duration: float = _LIMITS.max_clip_seconds
    concurrency: int = 0
    queue_size: int = QUEUE_SIZE
    batching: bool = True
    max_batch_rows: int = MAX_BATCH_ROWS
    feature_cache: int = FEATURE_CACHE
    zero_gpu: bool = False  # a Hugging Face ZeroGPU Space (SPACES_ZERO_GPU): each call gets a GPU of its own

    def __post_init__(self) -> None:
        for name, setting in SETTINGS.items():
            if setting.bounds:
                _check(setting.flag or "--" + name.replace("_", "-"), getattr(self, name), setting)

    @property
    def limits(self) -> MediaLimits:
        return MediaLimits(max_file_bytes=int(self.max_file_size * 2**20), max_clip_seconds=self.max_duration)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServingConfig:
        """The settings of the environment alone (defaults for the rest)."""
        return cls.parse([], environ)

    @classmethod
    def parse(cls, argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServingConfig:
        """Flags over environment variables over defaults; a bad value is an `InputError` naming it."""
        environ = os.environ if environ is None else environ
        args = vars(parser().parse_args(argv))
        values: dict[str, Any] = {"zero_gpu": _read("SPACES_ZERO_GPU", environ.get("SPACES_ZERO_GPU"), bool)}
        for name, setting in SETTINGS.items():
            if args[name] is not None:
                values[name] = args[name]
            elif setting.env in environ:
                values[name] = _read(setting.env, environ[setting.env], setting.kind)
                if setting.bounds:
                    _check(setting.env, values[name], setting)
        if values.get("preload") is not None:
            values["preload"] = tuple(values["preload"])
        return cls(**values)


def parser() -> argparse.ArgumentParser:
    """The app's flags: each unset (None) unless given, so that its variable or default applies."""
    defaults = {f.name: f.default for f in fields(ServingConfig)}
    parser = argparse.ArgumentParser(description="eP-ALM demo (Gradio)")
    for name, setting in SETTINGS.items():
        flag = setting.flag or "--" + name.replace("_", "-")
        shown = "off" if setting.flag else defaults[name]
        described = f"{setting.help} [{setting.env}; default: {shown}]"
        if setting.kind is bool:
            const = not setting.flag  # --no-batching sets batching to False
            parser.add_argument(flag, dest=name, action="store_const", const=const, default=None, help=described)
        elif setting.kind is list:
            parser.add_argument(flag, dest=name, nargs="*", metavar="TASK", default=None, help=described)
        else:
            parser.add_argument(flag, dest=name, type=_flag_type(flag, setting), default=None, help=described)
    return parser


def _flag_type(flag: str, setting: Setting) -> Any:
    def read(text: str) -> Any:
        value = _read(flag, text, setting.kind, error=argparse.ArgumentTypeError)
        if setting.bounds:
            _check(flag, value, setting, error=argparse.ArgumentTypeError)
        return value

    read.__name__ = setting.kind.__name__  # argparse names the type in its messages
    return read


def _check(name: str, value: Any, setting: Setting, error: type[Exception] = InputError) -> None:
    try:
        bounded(name, value, *setting.bounds, whole=setting.kind is int)
    except ValueError as exc:
        raise error(str(exc)) from None


def _read(name: str, text: str | None, kind: type, error: type[Exception] = InputError) -> Any:
    """A setting's value from its text (a flag's or a variable's)."""
    text = (text or "").strip()
    if kind is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise error(f"{name} must be 1 or 0, not {text!r}")
        return text.lower() in _TRUE
    if kind is list:
        return text.split()
    if kind is str:
        return text
    try:
        value = kind(text)
    except ValueError:
        raise error(f"{name} must be a {'whole ' if kind is int else ''}number, not {text!r}") from None
    if not math.isfinite(value):
        raise error(f"{name} must be a finite number, not {text!r}")
    return value
