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

import timm
import torch
import transformers
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import ASTModel, TimesformerModel


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


FEATURE_CACHE = 64  # inputs whose encoder features are kept (6 x 768 floats each at the OPT-2.7B shape)


class FeatureCache:
    """The features of recently encoded inputs, least recently used dropped first, at most `size`
    (0: off). An encoder's output for one prepared input is deterministic, and the frozen encoders
    are what serving cannot batch away (seconds for a video on a CPU), so a second question about
    the same picture or clip, or another user's click on the same example, reuses its features.

    Entries are keyed by the encoder object (a number it gets on first use, never reused, unlike
    `id()`), the blocks taken, and a digest of the input's dtype, shape and bytes (~10 ms for 16
    frames on a CPU). They are detached clones of one input's [num_blocks, dim] features, never views
    of a batch. Thread-safe; two threads missing the same input at once both encode it.
    """

    def __init__(self, size: int = FEATURE_CACHE) -> None:
        if size < 0:
            raise ValueError("the feature cache size must be 0 (off) or more")
        self.size = size
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._encoders: weakref.WeakKeyDictionary[Encoder, int] = weakref.WeakKeyDictionary()
        self._numbers = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self, encoder: Encoder, inputs: list[torch.Tensor], num_blocks: int) -> tuple[torch.Tensor, list[bool]]:
        """`encoder(torch.stack(inputs), num_blocks)` ([num_blocks, len(inputs), dim]) and which inputs
        were cached: the encoder runs once, on the inputs neither cached nor repeated in `inputs`."""
        if not self.size:
            return encoder(_batch(encoder, inputs), num_blocks), [False] * len(inputs)
        keys = [self._key(encoder, x, num_blocks) for x in inputs]
        with self._lock:
            found = {key: self._entries[key] for key in keys if key in self._entries}
            for key in found:
                self._entries.move_to_end(key)
        missing = {key: x for key, x in zip(keys, inputs) if key not in found}  # one of each repeated input
        if missing:
            features = encoder(_batch(encoder, list(missing.values())), num_blocks)
            with self._lock:
                for i, key in enumerate(missing):
                    found[key] = self._entries[key] = features[:, i].detach().clone()
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return torch.stack([found[key] for key in keys], dim=1), [key not in missing for key in keys]

    def _key(self, encoder: Encoder, x: torch.Tensor, num_blocks: int) -> tuple:
        data = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest = hashlib.blake2b(data, digest_size=16).digest()
        with self._lock:
            number = self._encoders.setdefault(encoder, next(self._numbers))
        return number, num_blocks, str(x.dtype), tuple(x.shape), digest


def _batch(encoder: Encoder, inputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(inputs).to(encoder.device)
