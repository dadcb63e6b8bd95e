"""What the model saw and how sure it was: the artefacts behind `Pipeline.stream(..., inspect=True)`.

eP-ALM reads little of its input (a 224-px square image, 8 or 16 frames, 10.3 s of log-mel
spectrogram) and a user who sees that understands its answers. An `Inspector` decodes the media
exactly as the pipeline does, keeps a viewable copy of the encoder's input (the tensor with only the
normalisation undone, so the pixels are the ones the encoder received), writes out the LM's text
prompt, and records the next-token log-probabilities of each decoding step, from which every
generated token gets its probability and every final beam its score. Nothing here runs unless asked.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .audio import FRAME_LENGTH_MS, FRAME_SHIFT_MS, AudioTransform, audio_fbank, load_window, window_seconds
from .decoding import DecodingOptions, stopped
from .image import ImageTransform, image_tensor, load_image, source_size
from .media import MediaLimits, container_duration, local_path, open_container
from .model import InjectionConfig
from .tasks import Task
from .video import VideoTransform, sample_video, video_tensor

SPECTROGRAM_ROW_PX = 2  # each mel bin is drawn two pixels tall: 128 bins -> 256 px


@dataclass
class Seen:
    """The encoder's input, viewable. `images` are uint8 [H, W, 3] arrays: the 224×224 image, each
    sampled frame, or the spectrogram drawn as a picture (time left to right, low pitch at the bottom);
    `captions` say what each one is."""

    modality: str
    images: list[np.ndarray]
    captions: list[str]
    source_size: tuple[int, int] | None = None  # image: (width, height) before the resize
    frame_indices: list[int] | None = None  # video: frame numbers in the clip
    timestamps: list[float] | None = None  # video: seconds at which each sampled frame is shown
    duration: float | None = None  # video, audio: the clip's length in seconds (None: unknown)
    heard_seconds: float | None = None  # audio: seconds of the clip the spectrogram covers
    cut: bool | None = None  # audio: the clip goes on past what the model heard
    padded: bool | None = None  # audio: the spectrogram was filled up with silence (zeros)
    spectrogram: np.ndarray | None = None  # audio: the AST input [frames, mel bins], normalised

    def summary(self) -> str:
        """One sentence on what the encoder received."""
        if self.modality == "image":
            width, height = self.source_size
            size = self.images[0].shape[1]
            kept = "aspect ratio kept" if width == height else "squashed to a square: aspect ratio not kept"
            return f"The {width}×{height} image, resized to {size}×{size} ({kept})."
        if self.modality == "video":
            length = f" of a {self.duration:.2f} s clip" if self.duration else ""
            size = self.images[0].shape[1]
            return (
                f"{len(self.images)} frames{length}, from {self.timestamps[0]:.2f} s to {self.timestamps[-1]:.2f} s, "
                f"{len(set(self.frame_indices))} of them different, each resized to {size}×{size}."
            )
        length = f"{self.duration:.2f} s" if self.duration else "longer"
        if self.cut:
            return f"The first {self.heard_seconds:.2f} s of a {length} clip: the rest was cut."
        window = (FRAME_LENGTH_MS + (len(self.spectrogram) - 1) * FRAME_SHIFT_MS) / 1000.0
        if self.padded:
            return f"All {self.heard_seconds:.2f} s of the clip, padded with silence to {window:.2f} s."
        return f"All {self.heard_seconds:.2f} s of the clip."

    def to_dict(self) -> dict[str, Any]:
        """Plain data (no arrays)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("images", "spectrogram") and v is not None}
        data["summary"] = self.summary()
        return data


@dataclass
class TokenProb:
    """One generated token, its text, and the model's probability of it given everything before
    (the softmax of the raw logits: before temperature or top-p)."""

    id: int
    text: str
    prob: float
    logprob: float


@dataclass
class Beam:
    """A final beam: `score` is what beam search ranked by (sum of log-probs over the length of the
    whole id sequence, as transformers 4.24 did); `logprob` is the sum over its new tokens."""

    text: str
    score: float
    logprob: float
    tokens: list[TokenProb]


@dataclass
class Inspection:
    """What the model saw (`seen`, `prompt`) and how sure it was (`tokens`, `beams`).

    `prompt` is the LM's input text: `[P×10]` for the soft prompt, then the tokens (BOS `</s>`, the
    question as formatted, `</a>`); `injection` says where the encoder's [CLS] vectors enter the LM.
    `tokens` are those of the answer (the best beam for beam search), ending with `</s>` when the
    model stopped by itself. `decoding` holds the settings used."""

    seen: Seen
    prompt: str
    injection: str
    decoding: dict[str, Any]
    tokens: list[TokenProb] = field(default_factory=list)
    beams: list[Beam] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: everything but the pixels."""
        return {
            "seen": self.seen.to_dict(),
            "prompt": self.prompt,
            "injection": self.injection,
            "decoding": self.decoding,
            "tokens": [asdict(t) for t in self.tokens],
            "beams": [asdict(b) for b in self.beams],
        }

    def describe(self, tokens: bool = True) -> str:
        """Markdown for people: the input, the prompt, the settings, the tokens (unless shown apart:
        `tokens=False`) and the beams."""
        settings = [f"{k.replace('_', ' ')} {v}" for k, v in self.decoding.items() if k != "strategy" and v is not None]
        soft_prompt = self.prompt.split("]")[0] + "]"
        parts = [
            f"**Input:** {_escape(self.seen.summary())}",
            f"**Prompt the language model read:** {_code(self.prompt)}, where {_code(soft_prompt)} is the learned "
            f"soft prompt; {_escape(self.injection)}.",
            f"**Decoding:** {' · '.join([self.decoding['strategy'], *settings])}",
        ]
        if self.tokens and tokens:
            shown = " ".join(f"{_code(t.text)} {_percent(t.prob)}" for t in self.tokens)
            parts.append(f"**Answer tokens and the model's probability of each:** {shown}")
        if self.beams:
            rows = [
                f"| {rank} | {_escape(b.text) or '(empty)'} | {b.score:.3f} | {_percent(math.exp(b.logprob))} |"
                for rank, b in enumerate(self.beams, 1)
            ]
            heading = "**Final beams** (score: what the search ranked them by; p: the probability of the answer):"
            parts.append("\n".join([heading, "", "| # | beam | score | p |", "|---|---|---|---|", *rows]))
        return "\n\n".join(parts)

    def save_pictures(self, folder: str | Path) -> list[Path]:
        """Write the seen images as PNG files into `folder`; returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = {"image": ["input.png"], "audio": ["spectrogram.png"]}.get(
            self.seen.modality, [f"frame{i + 1:02d}.png" for i in range(len(self.seen.images))]
        )
        paths = [folder / name for name in names]
        for path, pixels in zip(paths, self.seen.images):
            Image.fromarray(pixels).save(path)
        return paths

    def save(self, folder: str | Path, answer: str | None = None) -> list[Path]:
        """Write the seen images as PNG files and `inspection.json` into `folder`; returns the paths."""
        paths = self.save_pictures(folder)
        data = {"answer": answer, **self.to_dict()} if answer is not None else self.to_dict()
        data["seen"]["files"] = [path.name for path in paths]
        (Path(folder) / "inspection.json").write_text(json.dumps(data, indent=2, ensure_ascii=False))
        return paths + [Path(folder) / "inspection.json"]


def response_folder(root: Path, keep_s: float) -> Path:
    """A new folder under `root` for one response's files; the folders of responses older than `keep_s`
    seconds are deleted (a server writes one per answer)."""
    too_old = time.time() - keep_s
    for folder in root.glob("*"):
        with contextlib.suppress(OSError):
            if folder.stat().st_mtime < too_old:
                shutil.rmtree(folder)
    return root / uuid.uuid4().hex


def _escape(text: str) -> str:
    """Text shown as itself in Markdown (no emphasis, links, tables or HTML)."""
    return re.sub(r"([\\`*_{}\[\]<>()#+\-.!|~])", r"\\\1", text)


def _percent(prob: float) -> str:
    """'92%', '0.35%', '<0.01%'."""
    if prob >= 0.1:
        return f"{prob:.0%}"
    return f"{prob:.2%}" if prob >= 1e-4 else "<0.01%"


def _code(text: str) -> str:
    """Text in a code span, exactly (HTML-escaped, Markdown's own marks as entities, so `</a>`, `_` and
    backticks show as typed)."""
    escaped = html.escape(text).replace(" ", "&nbsp;")
    for mark in "_*`~\\[]":
        escaped = escaped.replace(mark, f"&#{ord(mark)};")
    return f"<code>{escaped}</code>"


def viewable(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 [..., H, W, 3] from a normalised [..., 3, H, W] encoder input: only the normalisation is
    undone, so normalising the result again gives back the encoder's input."""
    std_t, mean_t = torch.tensor(std)[:, None, None], torch.tensor(mean)[:, None, None]
    unit = pixels.detach().float().cpu() * std_t + mean_t
    return unit.mul(255.0).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1).numpy()


def spectrogram_picture(fbank: torch.Tensor) -> np.ndarray:
    """uint8 [bins · 2, frames, 3] grey picture of a [frames, bins] spectrogram: time left to right,
    low mel bins at the bottom, the lowest value black and the highest white."""
    values = fbank.detach().float().cpu().T.flip(0)
    low, high = values.min(), values.max()
    grey = ((values - low) / (high - low) * 255.0 if high > low else torch.zeros_like(values)).round().to(torch.uint8)
    grey = grey.repeat_interleave(SPECTROGRAM_ROW_PX, dim=0)
    return grey[:, :, None].expand(-1, -1, 3).contiguous().numpy()


def injection_text(injection: InjectionConfig) -> str:
    """Where the encoder's features enter the LM, in words."""
    blocks = f"the [CLS] vectors of the encoder's last {injection.num_features} blocks"
    layers = f"LM layers {injection.start_layer}–{injection.end_layer - 1}"
    connector = "one shared linear connector" if injection.shared_connector else "a linear connector per block"
    return f"{blocks}, through {connector}, into {layers} (shallow blocks to earlier layers)"


def clip_seconds(media: Any, sample_rate: int, limits: MediaLimits) -> float | None:
    """The whole clip's length: from an array's samples (a Gradio `(rate, samples)` pair, or samples at
    `sample_rate`), or from a file's header; None when the header does not say."""
    if isinstance(media, tuple):
        return max(np.shape(media[1])) / float(media[0])
    if isinstance(media, (np.ndarray, torch.Tensor)):
        return max(np.shape(media)) / sample_rate
    with local_path(media, limits) as path, open_container(path, "audio") as container:
        return container_duration(container)


def decoding_settings(options: DecodingOptions) -> dict[str, Any]:
    """The settings that shaped the answer, by strategy."""
    if options.max_new_tokens is not None:
        limit: dict[str, Any] = {"max_new_tokens": options.max_new_tokens}
    else:
        limit = {"max_length": options.max_length, "min_answer_tokens": options.min_answer_tokens}
    if options.num_beams > 1:
        beams = {"num_beams": options.num_beams, "length_penalty": options.length_penalty}
        return {"strategy": "beam search", **beams, **limit}
    if options.do_sample:
        return {
            "strategy": "sampling",
            "temperature": options.temperature,
            "top_p": options.top_p,
            "top_k": options.top_k,
            "seed": options.seed,
            **limit,
        }
    return {"strategy": "greedy", **limit}


class Inspector:
    """Collects the artefacts of one request: `prepare` decodes the media (as the pipeline's
    preprocessing does) and keeps what the encoder will see; the decoder calls `trace` each step.
    `timed` wraps the work only inspection adds to the media's decoding (the pipeline's observer times it)."""

    def __init__(self, task: Task, timed: Callable[[Callable], Callable] = lambda function: function) -> None:
        self.task, self.timed = task, timed
        self.seen: Seen | None = None
        self.prompt = ""
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def prepare(self, media: Any, transform: Any, limits: MediaLimits) -> torch.Tensor:
        """The encoder input for `media` (the same tensor `prepare_<modality>` gives), keeping a viewable copy."""
        if isinstance(transform, ImageTransform):
            image = load_image(media, limits)
            pixels = image_tensor(image, transform)
            picture = self.timed(viewable)(pixels, transform.mean, transform.std)
            self.seen = Seen("image", [picture], [], source_size=source_size(image))
            self.seen.captions = [self.seen.summary()]
        elif isinstance(transform, VideoTransform):
            sampled = sample_video(media, transform, limits)  # each frame resized as it is decoded
            pixels = video_tensor(sampled.frames, transform)
            self.seen = Seen(
                "video",
                list(self.timed(viewable)(pixels, transform.mean, transform.std)),
                [f"{t:.2f} s (frame {i})" for t, i in zip(sampled.timestamps, sampled.indices)],
                frame_indices=list(sampled.indices),
                timestamps=sampled.timestamps,
                duration=sampled.duration,
            )
        else:
            pixels = self._audio(media, transform, limits)
        return pixels

    def _audio(self, media: Any, transform: AudioTransform, limits: MediaLimits) -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            if not isinstance(media, (tuple, np.ndarray, torch.Tensor)):  # a file, read twice: bytes or a file
                media = stack.enter_context(local_path(media, limits))  # object become one path first
            wave = load_window(media, transform, limits)
            rate = transform.sample_rate
            needed = round(window_seconds(transform) * rate)  # samples behind target_length frames
            duration = len(wave) / rate
            if len(wave) > needed:  # the window was filled: how long is the whole clip?
                duration = self.timed(clip_seconds)(media, rate, limits)
        fbank = audio_fbank(wave, transform)
        self.seen = Seen(
            "audio",
            [self.timed(spectrogram_picture)(fbank)],
            [],
            duration=duration,
            heard_seconds=min(len(wave), needed) / rate,
            cut=len(wave) > needed,
            padded=len(wave) < needed,
            spectrogram=fbank.numpy(),
        )
        self.seen.captions = [self.seen.summary()]
        return fbank

    def read_prompt(self, input_ids: torch.Tensor, tokenizer: Any) -> None:
        """The LM's text input, from the ids it receives."""
        text = tokenizer.decode(input_ids[0].tolist(), skip_special_tokens=False)
        self.prompt = f"[P×{self.task.injection.prompt_len}]{text}"

    def trace(self, ids: torch.Tensor, logprobs: torch.Tensor) -> None:
        """`decoding.Trace`: keep each step's ids and next-token log-probabilities (read at the end)."""
        self.steps.append((ids, logprobs))

    def partial(self, options: DecodingOptions) -> Inspection:
        """What is known while decoding: the media and the prompt."""
        return Inspection(self.seen, self.prompt, injection_text(self.task.injection), decoding_settings(options))

    def result(
        self,
        tokenizer: Any,
        input_ids: torch.Tensor,
        options: DecodingOptions,
        new_ids: list[int],
        hypotheses: list[tuple[float, torch.Tensor]] | None = None,
    ) -> Inspection:
        """The final inspection: the answer's tokens `new_ids` with their probabilities and, for beam
        search, every final hypothesis (`GenerationOutput.hypotheses[0]`) best first."""
        inspection = self.partial(options)
        start = input_ids.shape[1]
        if hypotheses is None:
            inspection.tokens = self._probabilities(input_ids[0].tolist(), new_ids, tokenizer)
            return inspection
        limit = options.length_limit(start)
        for score, seq in sorted(hypotheses, key=lambda h: h[0], reverse=True):
            ids = seq.tolist()
            new = ids[start:] + ([options.eos_token_id] if stopped(len(ids), limit) else [])
            tokens = self._probabilities(ids[:start], new, tokenizer)
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            inspection.beams.append(Beam(text, score, sum(t.logprob for t in tokens), tokens))
        inspection.tokens = inspection.beams[0].tokens
        return inspection

    def _probabilities(self, context: list[int], new_ids: list[int], tokenizer: Any) -> list[TokenProb]:
        """Each new token's probability, read from the step whose ids were exactly its context."""
        tokens, seq = [], list(context)
        for token in new_ids:
            ids, logprobs = self.steps[len(seq) - len(context)]
            rows = (ids == torch.tensor(seq, device=ids.device)).all(dim=1).nonzero()
            logprob = logprobs[int(rows[0, 0]), token].item()
            text = tokenizer.decode([token], skip_special_tokens=False)
            tokens.append(TokenProb(token, text, math.exp(logprob), logprob))
            seq.append(token)
        return tokens
