"""The checks of one request's own values (task, question, decoding settings, frames), made before
anything loads: each refusal is an `InputError` that names the value and says what to do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

from .decoding import DecodingOptions
from .errors import InputError, bounded
from .presets import DEFAULT_PRESET, PRESETS
from .tasks import Task, Transform
from .video import MAX_FRAMES

# The question limits, the same in the library, the CLI and the app. The token limit bounds the prompt ids (BOS,
# question, the task's "?</a>"); the characters, checked first, are the cheap bound: 300 characters of English are
# about 75 OPT tokens, well inside it, so only densely tokenized text (symbols, non-Latin scripts) meets the token
# limit. However long the prompt within these limits, the task's `min_answer_tokens` still fit after it.
MAX_QUESTION_CHARS = 300
MAX_QUESTION_TOKENS = 128
OPTIONS = {
    f.name: f.type for f in dataclasses.fields(DecodingOptions) if f.name not in ("eos_token_id", "pad_token_id")
}


def check_texts(**values: Any) -> None:
    """Refuse any of these values that is given but is not text (raw JSON can send a list)."""
    for name, value in values.items():
        if value is not None and not isinstance(value, str):
            raise InputError(f"{name} must be text, not {type(value).__name__}")


def decoding_options(task: Task, preset: str | None, overrides: dict[str, Any]) -> DecodingOptions:
    """The task's settings, the preset's rules applied (default: paper, the task's own), then
    `overrides` (fields of `DecodingOptions`; None means "not given")."""
    preset = preset or DEFAULT_PRESET
    if not isinstance(preset, str) or preset not in PRESETS:
        raise InputError(f"unknown decoding preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(OPTIONS))
    if unknown:
        raise InputError(f"unknown decoding setting {unknown[0]!r}; the settings are {', '.join(OPTIONS)}")
    given = {name: whole(value) if "int" in OPTIONS[name] else value for name, value in overrides.items()}
    try:
        options = PRESETS[preset].apply(task.generation)
        return replace(options, **{k: v for k, v in given.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid decoding settings: {exc}") from exc


def transform(task: Task, num_frames: Any) -> Transform:
    """The task's preprocessing, with `num_frames` frames for a video (None: the task's own)."""
    if num_frames is None or task.modality != "video":
        return task.preprocess
    frames = whole(num_frames)
    try:
        bounded("frames to sample", frames, 1, MAX_FRAMES)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return replace(task.preprocess, num_frames=frames)


def check_question(task: Task, question: str | None) -> str | None:
    """The question, stripped, for a question task; None for a captioning task (which refuses one)."""
    if not task.needs_question:
        if question and question.strip():  # never answer something else than what was asked
            raise InputError(f"'{task.title}' writes a caption and takes no question; choose a question task.")
        return None
    question = (question or "").strip()
    if not question:
        raise InputError(f"Please type a question: '{task.title}' answers questions about the {task.modality}.")
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"The question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}.")
    if any(0xD800 <= ord(c) <= 0xDFFF or c == "\0" for c in question):
        raise InputError("The question holds characters that are not text; please type it again.")
    return question


def prompt_ids(task: Task, question: str | None, tokenizer: Any) -> list[int]:
    """BOS then the task's text, as the original tokenizer call produced them, within the token limit."""
    ids = task.text.prompt_ids(tokenizer, question)
    if len(ids) > MAX_QUESTION_TOKENS:
        raise InputError(
            f"The question is {len(ids)} tokens long; the limit is {MAX_QUESTION_TOKENS}. Please shorten it."
        )
    return ids


def check_length(options: DecodingOptions, prompt_ids: int, positions: int) -> str | None:
    """Refuse a length the LM has no positions for; return the notice for a limit raised to
    leave a long question its task's minimum answer."""
    limit = options.length_limit(prompt_ids)
    if limit > positions:
        raise InputError(
            f"{prompt_ids} prompt tokens and {limit - prompt_ids} new tokens exceed the model's {positions} "
            "positions; lower max new tokens."
        )
    if not options.extends_limit(prompt_ids):
        return None
    return (
        f"Long question: its {prompt_ids} tokens leave {max(0, options.max_length - prompt_ids)} of the task's "
        f"{options.max_length} (max_length counts the question), so the answer was allowed up to "
        f"{options.min_answer_tokens} new tokens; raise max new tokens for a longer answer."
    )


def whole(value: Any) -> Any:
    """A whole number given as a float (a slider's 5.0) as an int; anything else as it is (checked later)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
