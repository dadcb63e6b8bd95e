"""Frozen perceptual encoders, reduced to what eP-ALM reads from them.

eP-ALM takes, for each of the encoder's last N blocks, token 0 ([CLS]) of the block output passed
through the encoder's *final* LayerNorm (the same norm for every block). The models themselves are
the libraries' own: timm's ViT, transformers' TimesformerModel and ASTModel. A `FeatureCache` keeps
recent features, so media asked about again (another question, preset or task) skips its encoder.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import timm
import torch
import transformers
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import ASTModel, TimesformerModel

from .config import FEATURE_CACHE


class Encoder(nn.Module):
    """Wraps a frozen encoder; `forward(x, n)` returns [n, B, dim] [CLS] features, shallow to deep."""

    modality: str = ""

    def __init__(self, model: nn.Module, dim: int, depth: int) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.dim = dim
        self.depth = depth

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check(self, num_blocks: int) -> None:
        if not 1 <= num_blocks <= self.depth:
            raise ValueError(f"cannot take the last {num_blocks} blocks of a {self.depth}-block encoder")


class ImageEncoder(Encoder):
    """timm ViT; input [B, 3, H, W] normalised pixels at the model's configured size."""

    modality = "image"

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__(model, model.embed_dim, len(model.blocks))

    def forward(self, pixel_values: torch.Tensor, num_blocks: int) -> torch.Tensor:
        self._check(num_blocks)
        blocks = self.model.forward_intermediates(
            pixel_values.to(self.dtype),
            indices=num_blocks,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
        return torch.stack([prefix[:, 0] for _, prefix in blocks])


class _HiddenStatesEncoder(Encoder):
    """transformers encoders: final `layernorm` applied to each block's hidden state."""

    def _features(self, hidden_states: tuple[torch.Tensor, ...], num_blocks: int) -> torch.Tensor:
        blocks = hidden_states[1:][-num_blocks:]  # hidden_states[0] is the embedding output
        return torch.stack([self.model.layernorm(h[:, 0]) for h in blocks])


class VideoEncoder(_HiddenStatesEncoder):
    """transformers TimesformerModel; input [B, T, 3, H, W].

    Its layers take the frame count from `config.num_frames`, not from the input, while its
    embeddings resize the time embedding (nearest, as the original did) to the frames fed. So the
    config is set to the frames of each call, under a lock since the model is shared.
    """

    modality = "video"

    def __init__(self, model: TimesformerModel) -> None:
        super().__init__(model, model.config.hidden_size, model.config.num_hidden_layers)
        self._lock = threading.Lock()

    def forward(self, video: torch.Tensor, num_blocks: int) -> torch.Tensor:
        self._check(num_blocks)
        with self._lock:
            self.model.config.num_frames = video.shape[1]
            out = self.model(pixel_values=video.to(self.dtype), output_hidden_states=True)
        return self._features(out.hidden_states, num_blocks)


class AudioEncoder(_HiddenStatesEncoder):
    """transformers ASTModel; input [B, time_frames, mel_bins] normalised log-mel fbank.
    Token 1 (distillation) is ignored like any other non-[CLS] token."""

    modality = "audio"

    def __init__(self, model: ASTModel) -> None:
        super().__init__(model, model.config.hidden_size, model.config.num_hidden_layers)

    def forward(self, fbank: torch.Tensor, num_blocks: int) -> torch.Tensor:
        self._check(num_blocks)
        out = self.model(input_values=fbank.to(self.dtype), output_hidden_states=True)
        return self._features(out.hidden_states, num_blocks)


def wrap_encoder(model: nn.Module) -> Encoder:
    """The eP-ALM view of a library encoder model."""
    if isinstance(model, VisionTransformer):
        return ImageEncoder(model)
    if isinstance(model, TimesformerModel):
        return VideoEncoder(model)
    if isinstance(model, ASTModel):
        return AudioEncoder(model)
    raise TypeError(f"unsupported encoder {type(model).__name__}: expected timm ViT, TimesformerModel or ASTModel")


def attention_kernel(model_class: type) -> str:
    """transformers' attention for an encoder class: the fused kernel (SDPA) where the class has it
    (AST: 19% less time for a clip on CPU, the same features to float rounding), else the eager one."""
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def build_encoder(library: str, class_path: str, config: dict) -> Encoder:
    """A randomly initialised encoder from a class name and its config kwargs (no download).

    `library` is "timm" (kwargs for the class) or "transformers" (kwargs for its config class).
    """
    name = class_path.rsplit(".", 1)[-1]
    if library == "timm":
        module = importlib.import_module(class_path.rsplit(".", 1)[0]) if "." in class_path else timm.models
        model = getattr(module, name)(**config)
    elif library == "transformers":
        model_class = getattr(transformers, name)
        model = model_class(model_class.config_class(**config, attn_implementation=attention_kernel(model_class)))
    else:
        raise ValueError(f"unknown encoder library {library!r}")
    return wrap_encoder(model)


class FeatureCache:
    """Encodes inputs for the requests of many threads, keeping the features of recent ones.

    `features()` runs on each request's own thread, so that an encoder never stalls the decode
    steps of the requests already running (`epalm.serving`); the requests waiting for one encoder at
    the same moment are encoded together, in one call, by whichever of their threads takes the encoder
    first (the others wait for it, then take it in turn for what arrived meanwhile).

    The features of the last `size` inputs are kept (0: none), least recently used dropped first: an
    encoder's output for one prepared input is deterministic, and the frozen encoders are what serving
    cannot batch away (seconds for a video on a CPU), so a second question about the same picture or
    clip, or another user's click on the same example, skips its encoder. Entries are keyed by the
    encoder object (a number it gets on first use, never reused, unlike `id()`), the blocks taken, and a
    digest of the input's dtype, shape and bytes (~10 ms for 16 frames on a CPU), and are detached
    clones of one input's [num_blocks, dim] features, never views of a batch.
    """

    def __init__(self, size: int = FEATURE_CACHE) -> None:
        if size < 0:
            raise ValueError("the feature cache size must be 0 (off) or more")
        self.size = size
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._encoders: weakref.WeakKeyDictionary[Encoder, int] = weakref.WeakKeyDictionary()
        self._numbers = itertools.count()
        self._waiting: dict[int, list[_Wanted]] = {}  # encoder number -> inputs waiting for it
        self._busy: set[int] = set()  # encoders running now
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return len(self._entries)

    def features(self, encoder: Encoder, x: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, bool]:
        """The [num_blocks, dim] features of one prepared input, and whether they were kept from before."""
        wanted = _Wanted(self._key(encoder, x, num_blocks), x, num_blocks)
        number = wanted.key[0]
        with self._changed:
            if self.size and wanted.key in self._entries:
                self._entries.move_to_end(wanted.key)
                return self._entries[wanted.key], True
            self._waiting.setdefault(number, []).append(wanted)
        while True:
            with self._changed:
                while number in self._busy and not wanted.done:
                    self._changed.wait()
                if wanted.done:
                    break
                batch = []
                for waiting in self._waiting.pop(number, []):  # those encoded meanwhile (the same media) are kept
                    if self.size and waiting.key in self._entries:
                        waiting.features, waiting.cached, waiting.done = self._entries[waiting.key], True, True
                    else:
                        batch.append(waiting)
                if not batch:
                    self._changed.notify_all()
                    break
                self._busy.add(number)  # this thread runs the encoder, for all that wait for it now
            try:
                self._encode(encoder, batch)
            except BaseException as exc:  # (an interrupt: every input of the batch hears it, none waits on)
                for waiting in batch:
                    if not waiting.done:
                        waiting.error, waiting.done = exc, True
                raise
            finally:
                with self._changed:
                    self._busy.discard(number)
                    self._changed.notify_all()
        if wanted.error is not None:
            raise wanted.error
        return wanted.features, wanted.cached

    def _encode(self, encoder: Encoder, batch: list[_Wanted]) -> None:
        """Run the encoder once per input shape and block count over `batch` (each distinct input once),
        and hand every waiting input its features (or the encoder's error)."""
        groups: dict[tuple, list[_Wanted]] = {}
        for wanted in batch:
            groups.setdefault((tuple(wanted.x.shape), wanted.num_blocks), []).append(wanted)
        for (_, num_blocks), group in groups.items():
            distinct = list({wanted.key: wanted for wanted in group}.values())
            try:
                with torch.inference_mode():
                    output = encoder(torch.stack([w.x for w in distinct]).to(encoder.device), num_blocks)
                found = {wanted.key: output[:, i].detach().clone() for i, wanted in enumerate(distinct)}
            except Exception as exc:  # the failure belongs to these inputs only
                for wanted in group:
                    wanted.error, wanted.done = exc, True
                continue
            with self._changed:
                for key, features in found.items():
                    if self.size:
                        self._entries[key] = features
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            for wanted in group:
                wanted.features, wanted.done = found[wanted.key], True

    def _key(self, encoder: Encoder, x: torch.Tensor, num_blocks: int) -> tuple:
        data = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest = hashlib.blake2b(data, digest_size=16).digest()
        with self._changed:
            number = self._encoders.setdefault(encoder, next(self._numbers))
        return number, num_blocks, str(x.dtype), tuple(x.shape), digest


@dataclass(eq=False)
class _Wanted:
    """One input waiting for its encoder, and what it got."""

    key: tuple
    x: torch.Tensor
    num_blocks: int
    done: bool = False
    cached: bool = False
    features: torch.Tensor | None = None
    error: BaseException | None = None
