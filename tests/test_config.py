"""The serving settings: flags over environment variables over defaults, each checked where it is read."""

from __future__ import annotations

import sys
import types

import pytest

from epalm import MediaLimits, Pipeline, ServingConfig
from epalm.config import FEATURE_CACHE, MAX_BATCH_ROWS, SETTINGS
from epalm.errors import InputError


def test_flags_have_environment_equivalents_and_defaults_are_the_library_s(monkeypatch):
    for setting in SETTINGS.values():
        monkeypatch.delenv(setting.env, raising=False)
    default = ServingConfig.parse([])
    assert default == ServingConfig(), "nothing given: the defaults stated once, in ServingConfig"
    assert (default.max_batch_rows, default.feature_cache) == (MAX_BATCH_ROWS, FEATURE_CACHE)
    assert default.max_duration == MediaLimits().max_clip_seconds, "one duration limit, the library's"
    assert default.preload is None and not default.allow_local_adapters
    environ = {
        "EPALM_TINY": "1",
        "EPALM_DEVICE": "cpu",
        "EPALM_CONCURRENCY": "3",
        "EPALM_PRELOAD": "image-caption audio-caption",
        "EPALM_ALLOW_LOCAL_ADAPTERS": "yes",
    }
    config = ServingConfig.parse([], environ)
    assert (config.tiny, config.device, config.concurrency, config.allow_local_adapters) == (True, "cpu", 3, True)
    assert config.preload == ("image-caption", "audio-caption")
    assert ServingConfig.parse(["--concurrency", "5"], environ).concurrency == 5, "a flag wins over its variable"
    assert ServingConfig.parse(["--preload"], environ).preload == ()
    assert ServingConfig.parse([], {"EPALM_PRELOAD": ""}).preload == ()


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-file-size", "nan"],
        ["--max-file-size", "0"],
        ["--max-file-size", "-5"],
        ["--max-duration", "nan"],
        ["--max-duration", "0"],
        ["--max-duration", "-1"],
        ["--queue-size", "0"],
        ["--queue-size", "-1"],
        ["--concurrency", "-1"],
        ["--max-batch-rows", "0"],
        ["--feature-cache", "-1"],
        ["--port", "70000"],
        ["--queue-size", "many"],
    ],
)
def test_bad_flags_are_refused_at_start_naming_the_flag(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        ServingConfig.parse(flags)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flags[0]}: {flags[0]} must be" in error, error


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("EPALM_MAX_FILE_SIZE", "nan", "EPALM_MAX_FILE_SIZE must be a finite number, not 'nan'"),
        ("EPALM_MAX_DURATION", "-1", "EPALM_MAX_DURATION must be a number from 0.1 to 1e+06, not -1.0"),
        ("EPALM_CONCURRENCY", "-1", "EPALM_CONCURRENCY must be a whole number from 0 to 1024, not -1"),
        ("EPALM_MAX_BATCH_ROWS", "many", "EPALM_MAX_BATCH_ROWS must be a whole number, not 'many'"),
        ("EPALM_BATCHING", "maybe", "EPALM_BATCHING must be 1 or 0, not 'maybe'"),
    ],
)
def test_bad_variables_are_refused_naming_the_variable(name, value, message):
    with pytest.raises(InputError, match=message.replace("+", "\\+").replace("(", "\\(")):
        ServingConfig.parse([], {name: value})


def test_only_a_zero_gpu_space_turns_batching_off_not_the_spaces_package(monkeypatch):
    """A CPU Space or a laptop may have `spaces` installed: only SPACES_ZERO_GPU says the calls run on ZeroGPU."""
    monkeypatch.setitem(sys.modules, "spaces", types.ModuleType("spaces"))
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert Pipeline.from_config(ServingConfig.parse(["--tiny", "--device", "cpu"])).batching
    zero = ServingConfig.parse(["--tiny", "--device", "cpu"], {"SPACES_ZERO_GPU": "true"})
    assert zero.zero_gpu and not Pipeline.from_config(zero).batching
