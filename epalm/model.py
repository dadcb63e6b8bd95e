"""The eP-ALM model: a frozen OPT whose late layers receive projected encoder [CLS] vectors.

Only what eP-ALM adds lives here: the adapter (connectors + soft prompt), the embedding stage
(prompt without positions, text positions counted from the text mask), the loop over transformers'
own `OPTDecoderLayer`s with the late injection, and a key/value cache that stays exact.

Why a plain cache is not exact: before layer `start` the visual token is prepended at position 0
and its query attends to *every* position (later text and pads included). Its output at layer
`end - 1` feeds layer `end`, so whenever a token is appended the visual state entering layer `end`
changes, and with it everything from layer `end` on. Layers before `end` see a constant visual
input (the projected [CLS] is re-injected before each of them), so their cache stays valid. Each
decoding step therefore (1) runs the new token through the cached layers `< end`, (2) re-runs the
single visual query of layer `end - 1` over that layer's keys/values (in the same pass as the new
token, so that layer's weights are read once), and (3) recomputes the layers `>= end` (for the
paper's OPT-2.7B, `end = 31` of 32 layers: only the visual key/value of the last layer changes,
which the last layer's cache takes in place).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import OPTForCausalLM

from .errors import bounded

logger = logging.getLogger(__name__)

MAX_LAYERS = 128  # an LM's decoder layers and an encoder's blocks (OPT-66B has 64, ViT-L 24)


@dataclass(frozen=True)
class InjectionConfig:
    """Where and how the encoder features enter the LM (the `epalm` part of a task)."""

    start_layer: int  # first decoder layer that receives a visual token
    end_layer: int  # exclusive: layers >= end_layer read the visual state, nothing is injected
    num_features: int  # N: the encoder's last N blocks are injected, shallow to deep
    shared_connector: bool = False  # one Linear for all N features instead of N
    prompt_len: int = 10
    prompt_mlp: bool = True  # soft prompt followed by Linear-Tanh-Linear

    def __post_init__(self) -> None:
        bounded("start_layer", self.start_layer, 0, MAX_LAYERS - 1)
        bounded("end_layer", self.end_layer, 1, MAX_LAYERS)
        if self.start_layer >= self.end_layer:
            raise ValueError(f"need start_layer < end_layer, got {self.start_layer}, {self.end_layer}")
        bounded("num_features", self.num_features, 1, MAX_LAYERS)
        bounded("prompt_len", self.prompt_len, 0, 128)
        for name in ("shared_connector", "prompt_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false")

    @property
    def layout(self) -> tuple[int, int, int, int]:
        """What fixes the LM's sequence and cache layout: rows with equal layouts can share a forward
        (the connector and prompt settings only shape the adapter)."""
        return self.start_layer, self.end_layer, self.num_features, self.prompt_len

    def feature_index(self, layer: int) -> int | None:
        """Which of the N projected features is injected before `layer` (None: no injection)."""
        if not self.start_layer <= layer < self.end_layer:
            return None
        span = self.end_layer - self.start_layer
        step = span // self.num_features if span > self.num_features else 1
        return min((layer - self.start_layer) // step, self.num_features - 1)


class SoftPrompt(nn.Module):
    """P learned vectors in the LM's word-embedding space, optionally reparametrised by an MLP."""

    def __init__(self, length: int, dim: int, mlp: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Embedding(length, dim)]
        if mlp:
            layers += [nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim)]
        self.prefix_embedding = nn.Sequential(*layers)  # key names match the original checkpoints
        self.register_buffer("ids", torch.arange(length), persistent=False)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.prefix_embedding(self.ids).unsqueeze(0).expand(batch_size, -1, -1)


class Adapter(nn.Module):
    """The trained part of eP-ALM for one task: connectors and soft prompt (a few million weights).

    Its state dict uses the original key names (`connector.{j}.*`, `prompt_module.prefix_embedding.*`),
    so an original checkpoint loads with `load_state_dict(strict=True)`.
    """

    def __init__(self, config: InjectionConfig, encoder_dim: int, hidden_size: int, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        count = 1 if config.shared_connector else config.num_features
        self.connector = nn.ModuleList(nn.Linear(encoder_dim, hidden_size) for _ in range(count))
        self.prompt_module = SoftPrompt(config.prompt_len, embed_dim, config.prompt_mlp)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[N, B, encoder_dim] [CLS] features (shallow to deep) -> [N, B, hidden_size]."""
        weights = self.connector[0].weight
        features = features.to(weights.dtype)
        return torch.stack([self.connector[0 if len(self.connector) == 1 else j](f) for j, f in enumerate(features)])

    def prompt(self, batch_size: int) -> torch.Tensor:
        """[B, P, embed_dim]: identical for every row and independent of the input."""
        return self.prompt_module(batch_size)

    def prefix(self, features: torch.Tensor) -> Prefix:
        """Everything the LM needs from the encoder side for one batch."""
        return Prefix(self.project(features), self.prompt(features.shape[1]), self.config)


@dataclass
class Prefix:
    """Per-call inputs of the injected LM: projected features, soft prompt and injection settings."""

    visual: torch.Tensor  # [N, B, hidden_size]
    prompt: torch.Tensor  # [B, P, embed_dim]
    injection: InjectionConfig

    def select(self, index: torch.Tensor) -> Prefix:
        """The rows `index` of the batch (beam expansion and reordering)."""
        return replace(self, visual=self.visual.index_select(1, index), prompt=self.prompt.index_select(0, index))

    def repeat_interleave(self, repeats: int) -> Prefix:
        """Row b -> rows b*k .. b*k+k-1, the layout beam search uses."""
        return self.select(torch.arange(self.prompt.shape[0], device=self.prompt.device).repeat_interleave(repeats))

    @staticmethod
    def cat(prefixes: list[Prefix]) -> Prefix:
        """The rows of several prefixes (one injection layout) as one batch: each row keeps its own
        features and prompt, so rows of different tasks and adapters share a forward."""
        layouts = {p.injection.layout for p in prefixes}
        if len(layouts) != 1:
            raise ValueError(f"cannot batch prefixes of different injection layouts: {sorted(layouts)}")
        visual = torch.cat([p.visual for p in prefixes], dim=1)
        return replace(prefixes[0], visual=visual, prompt=torch.cat([p.prompt for p in prefixes], dim=0))


class KVCache:
    """Keys/values per decoder layer, in the interface OPTAttention calls (`update`).

    Besides appending, two modes serve the cache refresh: `append_after_first` appends all but the
    first query's key/value (layer end-1 runs the visual query, whose key/value is already row 0,
    together with the new token) and `refresh_first` overwrites row 0 (the visual key/value of the
    last layer) and appends the rest.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.mode = "append"

    @contextlib.contextmanager
    def using(self, mode: str) -> Iterator[None]:
        self.mode = mode
        try:
            yield
        finally:
            self.mode = "append"

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.keys:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        elif self.mode == "append_after_first":
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key[:, :, 1:]], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value[:, :, 1:]], dim=2)
        elif self.mode == "refresh_first":
            keys, values = self.keys[layer_idx], self.values[layer_idx]
            self.keys[layer_idx] = torch.cat([key[:, :, :1], keys[:, :, 1:], key[:, :, 1:]], dim=2)
            self.values[layer_idx] = torch.cat([value[:, :, :1], values[:, :, 1:], value[:, :, 1:]], dim=2)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def reorder(self, index: torch.Tensor) -> None:
        for store in (self.keys, self.values):
            for layer_idx, tensor in store.items():
                store[layer_idx] = tensor.index_select(0, index)


def additive_mask(key_mask: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal + padding additive mask [B, 1, queries, K] for the last `queries` of K positions."""
    batch, keys = key_mask.shape
    device = key_mask.device
    query_pos = torch.arange(keys - queries, keys, device=device)[:, None]
    allowed = (torch.arange(keys, device=device)[None, :] <= query_pos)[None] & key_mask[:, None, :].bool()
    mask = torch.zeros(batch, 1, queries, keys, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def with_visual_column(mask: torch.Tensor, visual_row: bool) -> torch.Tensor:
    """Add the visual token's key column of zeros (every query attends to it) and, for a forward
    that holds the visual query, its row of zeros (it attends to every position, pads included)."""
    mask = nn.functional.pad(mask, (1, 0))
    return nn.functional.pad(mask, (0, 0, 1, 0)) if visual_row else mask


@dataclass
class DecodeState:
    """What the cached decoder keeps between steps for one (possibly beam-expanded) batch.

    Rows decoded together that started from different text lengths (a serving batch) are aligned
    by `holes`: text slots that exist only to line the rows up. Unlike a pad of the input, which the
    visual query attends to as the original did, a hole is seen by no query.
    """

    prefix: Prefix
    text_mask: torch.Tensor  # [B, T] text attention mask so far (1 per appended token, 0 at pads and holes)
    cache: KVCache
    late_input: torch.Tensor | None  # [B, 1+P+T, H] input of layer `end` (when layers > end exist)
    holes: torch.Tensor | None = None  # [B, T] bool, True at alignment slots; None: there are none

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows `index` in that order (beams following their parents, finished rows leaving)."""
        self.prefix = self.prefix.select(index)
        self.text_mask = self.text_mask.index_select(0, index)
        self.cache.reorder(index)
        if self.late_input is not None:
            self.late_input = self.late_input.index_select(0, index)
        if self.holes is not None:
            self.holes = self.holes.index_select(0, index)
            self._drop_common_holes()

    def _drop_common_holes(self) -> None:
        """Remove the text slots that are holes in every row (the rows they aligned with have left)."""
        common = self.holes.all(0)
        if common.any():
            width = self.text_mask.shape[1]
            keep = (~common).nonzero().squeeze(1)

            def select(tensor: torch.Tensor, dim: int) -> torch.Tensor:
                before = tensor.shape[dim] - width  # visual and prompt slots
                return tensor.index_select(dim, torch.cat([torch.arange(before, device=keep.device), keep + before]))

            self._map_text(select)
            self.holes = self.holes.index_select(1, keep)
        if not self.holes.any():
            self.holes = None

    def _map_text(self, change) -> None:
        """Apply `change(tensor, dim)` to every tensor whose `dim` ends with the text slots."""
        self.text_mask = change(self.text_mask, 1)
        for store in (self.cache.keys, self.cache.values):
            for layer_idx, tensor in store.items():
                store[layer_idx] = change(tensor, 2)
        if self.late_input is not None:
            self.late_input = change(self.late_input, 1)

    def hide_holes(self, mask: torch.Tensor) -> torch.Tensor:
        """`mask` [B, 1, Q, K] whose query 0 is the visual token, with the holes hidden from it."""
        if self.holes is None:
            return mask
        hidden = nn.functional.pad(self.holes, (mask.shape[-1] - self.holes.shape[1], 0))
        mask = mask.clone()
        mask[:, :, 0] = mask[:, :, 0].masked_fill(hidden[:, None], torch.finfo(mask.dtype).min)
        return mask

    @staticmethod
    def cat(states: list[DecodeState]) -> DecodeState:
        """The rows of several states (one LM, one injection layout) as one batch, consuming them;
        shorter texts are padded on the right with holes. Each row decodes as it would alone."""
        width = max(state.text_mask.shape[1] for state in states)
        for state in states:
            extra = width - state.text_mask.shape[1]
            if state.holes is None:
                state.holes = torch.zeros_like(state.text_mask, dtype=torch.bool)
            if extra:
                state._map_text(functools.partial(_pad_after, extra=extra))
                state.holes = nn.functional.pad(state.holes, (0, extra), value=True)
        first = states[0]
        cache = KVCache()
        for layer_idx in first.cache.keys:
            cache.keys[layer_idx] = torch.cat([state.cache.keys[layer_idx] for state in states])
            cache.values[layer_idx] = torch.cat([state.cache.values[layer_idx] for state in states])
        late_input = None if first.late_input is None else torch.cat([state.late_input for state in states])
        holes = torch.cat([state.holes for state in states])
        text_mask = torch.cat([state.text_mask for state in states])
        prefix = Prefix.cat([state.prefix for state in states])
        return DecodeState(prefix, text_mask, cache, late_input, holes if holes.any() else None)


def _pad_after(tensor: torch.Tensor, dim: int, extra: int) -> torch.Tensor:
    """`tensor` with `extra` zero slots appended along `dim`."""
    return nn.functional.pad(tensor, [0, 0] * (tensor.ndim - dim - 1) + [0, extra])


class EPALM(nn.Module):
    """A frozen `OPTForCausalLM` driven with eP-ALM's soft prompt and late visual injection.

    It holds no adapter: the adapter's output (a `Prefix`) is passed per call, so one LM serves
    every task at once.
    """

    def __init__(self, lm: OPTForCausalLM) -> None:
        super().__init__()
        self.lm = lm.eval().requires_grad_(False)
        self.decoder = lm.model.decoder
        self.checkpointing = False  # training: recompute each layer's activations in the backward pass

    @property
    def config(self):
        return self.lm.config

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    def _late_start(self, injection: InjectionConfig) -> int:
        """First layer that must be recomputed each step (= end_layer, or L if no such layer)."""
        return min(injection.end_layer, len(self.decoder.layers))

    def _embed(self, input_ids: torch.Tensor, text_mask: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
        """[prompt ; text] in hidden space; positions on the text part only, from the text mask only.

        With `prompt=None` only the last `input_ids.shape[1]` text positions are embedded (a step).
        """
        positions = (text_mask.cumsum(1) * text_mask - 1)[:, -input_ids.shape[1] :]
        embeds = self.decoder.embed_tokens(input_ids)
        if prompt is not None:
            embeds = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)
        if self.decoder.project_in is not None:
            embeds = self.decoder.project_in(embeds)
        pos = self.decoder.embed_positions.weight[positions + self.decoder.embed_positions.offset]
        return torch.cat([embeds[:, : embeds.shape[1] - pos.shape[1]], embeds[:, -pos.shape[1] :] + pos], dim=1)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.decoder.final_layer_norm is not None:
            hidden = self.decoder.final_layer_norm(hidden)
        if self.decoder.project_out is not None:
            hidden = self.decoder.project_out(hidden)
        return self.lm.lm_head(hidden)

    def _visual(self, prefix: Prefix, layer: int) -> torch.Tensor:
        j = prefix.injection.feature_index(layer)
        return prefix.visual[j].to(self.dtype).unsqueeze(1)

    def _run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: Prefix, cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The original forward over the whole sequence; returns (hidden before the head,
        input of layer `end`). With a cache, layers before `end` store their keys/values."""
        injection = prefix.injection
        full_mask = torch.cat(
            [attention_mask.new_ones(attention_mask.shape[0], prefix.prompt.shape[1]), attention_mask], 1
        )
        mask = additive_mask(full_mask, full_mask.shape[1], self.dtype)
        hidden = self._embed(input_ids, attention_mask, prefix.prompt)
        # embedding dropout, as the original's decoder had; active only while the LM is in train mode (training)
        hidden = nn.functional.dropout(hidden, p=self.config.dropout, training=self.lm.training)
        late_start, late_input = self._late_start(injection), None
        for idx, layer in enumerate(self.decoder.layers):
            if idx == injection.start_layer:
                hidden = torch.cat([self._visual(prefix, idx), hidden], dim=1)
                mask = with_visual_column(mask, visual_row=True)
            elif injection.start_layer < idx < injection.end_layer:
                hidden = torch.cat([self._visual(prefix, idx), hidden[:, 1:]], dim=1)
            if idx == late_start:
                late_input = hidden
            use_cache = cache is not None and (idx < late_start or idx == self._cached_late_layer(injection))
            if self.checkpointing and cache is None and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, attention_mask=mask, use_reentrant=False)
            else:
                hidden = layer(hidden, attention_mask=mask, cache=cache if use_cache else None)
        return hidden, late_input

    def _cached_late_layer(self, injection: InjectionConfig) -> int | None:
        """When `end` is the last layer, its cache stays valid but for row 0 (refreshed in place)."""
        return injection.end_layer if injection.end_layer == len(self.decoder.layers) - 1 else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: Prefix) -> torch.Tensor:
        """Logits [B, 1+P+T, V] exactly as the original `evaluate` forward returns them."""
        hidden, _ = self._run(input_ids, attention_mask, prefix, cache=None)
        return self._head(hidden)

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: Prefix
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run the prompt once, filling the cache; returns the next-token logits [B, V] and the state."""
        cache = KVCache()
        hidden, late_input = self._run(input_ids, attention_mask, prefix, cache)
        if self._cached_late_layer(prefix.injection) is not None:
            late_input = None
        state = DecodeState(prefix, attention_mask, cache, late_input)
        return self._head(hidden[:, -1]), state

    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row ([B]) and return the next-token logits [B, V]."""
        injection, prefix = state.prefix.injection, state.prefix
        state.text_mask = torch.cat([state.text_mask, state.text_mask.new_ones(len(tokens), 1)], dim=1)
        if state.holes is not None:
            state.holes = nn.functional.pad(state.holes, (0, 1), value=False)
        full_mask = torch.cat([state.text_mask.new_ones(len(tokens), prefix.prompt.shape[1]), state.text_mask], 1)
        mask = additive_mask(full_mask, 1, self.dtype)
        hidden = self._embed(tokens[:, None], state.text_mask, prompt=None)
        late_start = self._late_start(injection)
        refresh_layer = late_start - 1 if late_start < len(self.decoder.layers) else None
        for idx in range(late_start):
            if idx == injection.start_layer:
                mask = with_visual_column(mask, visual_row=False)
            if idx != refresh_layer:
                hidden = self.decoder.layers[idx](hidden, attention_mask=mask, cache=state.cache)
        if refresh_layer is None:
            return self._head(hidden[:, -1])
        # Refresh: the visual query of layer end-1 attends to every key/value of that layer, the new
        # token's included; it runs as an extra row next to the new token (mask row of zeros).
        rows_mask = state.hide_holes(torch.cat([torch.zeros_like(mask), mask], dim=2))
        with state.cache.using("append_after_first"):
            both = self.decoder.layers[refresh_layer](
                torch.cat([self._visual(prefix, refresh_layer), hidden], dim=1),
                attention_mask=rows_mask,
                cache=state.cache,
            )
        visual_out, hidden = both[:, :1], both[:, 1:]
        if self._cached_late_layer(injection) is not None:
            with state.cache.using("refresh_first"):
                hidden = self.decoder.layers[late_start](
                    torch.cat([visual_out, hidden], dim=1), attention_mask=rows_mask, cache=state.cache
                )
            return self._head(hidden[:, -1])
        state.late_input = torch.cat([visual_out, state.late_input[:, 1:], hidden], dim=1)
        hidden = state.late_input
        mask = with_visual_column(additive_mask(full_mask, full_mask.shape[1], self.dtype), visual_row=True)
        mask = state.hide_holes(mask)
        for layer in self.decoder.layers[late_start:]:
            hidden = layer(hidden, attention_mask=mask)
        return self._head(hidden[:, -1])


class PackedLinear(nn.Module):
    """A frozen `nn.Linear` whose weight is stored in oneDNN's blocked layout (CPU inference).

    A decode step multiplies one row (or one per beam) by every weight matrix, so it is bound by
    how fast the weights are read. On CPU, torch's default path (MKL GEMV) reads them well below
    the machine's bandwidth; the pre-packed oneDNN kernel (the one `torch.compile`'s freezing uses)
    gets closer (bench/RESULTS.md has the measurements). Same maths, other summation order: outputs
    differ from `nn.Linear` by float rounding. The oneDNN calls are private to torch, so `checked`
    builds one only after comparing it with the dense layer.
    """

    TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative error of a product, rounding only

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    @classmethod
    @torch.no_grad()
    def checked(cls, linear: nn.Linear) -> PackedLinear | None:
        """The packed layer if, on a 3-row input (a beam step), it gives the dense layer's outputs up
        to rounding; None (logged) if this torch's oneDNN calls are missing, fail or disagree."""
        weight = linear.weight
        generator = torch.Generator(device=weight.device).manual_seed(0)
        x = torch.randn(3, linear.in_features, generator=generator, device=weight.device).to(weight.dtype)
        try:
            packed = cls(linear)
            got = packed(x).float()
        except (RuntimeError, AttributeError, TypeError, ValueError) as exc:
            logger.warning(
                "oneDNN weight packing fails in torch %s (%s); keeping the dense layers", torch.__version__, exc
            )
            return None
        want = linear(x).float()
        error = ((got - want).norm() / want.norm().clamp_min(1e-12)).item() if got.shape == want.shape else float("inf")
        if not error <= cls.TOLERANCE.get(weight.dtype, 0.0):  # NaN fails too
            logger.warning(
                "oneDNN packed weights disagree with the dense layer in torch %s (relative error %.3g); keeping the "
                "dense layers",
                torch.__version__,
                error,
            )
            return None
        return packed

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `PackedLinear` serves weights of this device and dtype: oneDNN's layout is a CPU one."""
    return device.type == "cpu" and dtype in PackedLinear.TOLERANCE and torch.backends.mkldnn.is_available()


def can_pack(weight: torch.Tensor) -> bool:
    return packs(weight.device, weight.dtype)


@torch.no_grad()
def pack_linear_weights(model: EPALM, head: bool = True, release: Callable[[torch.Tensor], None] | None = None) -> int:
    """Swap every Linear of the decoder layers (and the LM head) for a `PackedLinear`, one at a time:
    the dense weight is freed as its packed copy is made, so there is no second copy of the model.
    The head is tied to the token embedding, which keeps its dense weight: packing the head adds
    one embedding-sized copy (0.5 GB for OPT-2.7B in float32) and saves the slowest product of a
    beam step (`head=False` keeps the tie). CPU, float32/bfloat16 only; a no-op elsewhere.
    Do it last: packed weights do not follow `.to()`. The first layer of each shape is checked
    against its dense self (the same kernel and layout serve the others); at the first check that
    fails, packing stops and the rest stay dense. `release(weight)` is called with each dense weight
    once packed (weights mapped from a file: their pages are handed back, see `weight_files`).
    Returns how many layers were packed."""
    count, checked = 0, set()

    def pack(linear: nn.Linear) -> PackedLinear | None:
        kind = (linear.weight.shape, linear.weight.dtype, linear.bias is not None)
        if kind in checked:
            return PackedLinear(linear)
        packed = PackedLinear.checked(linear)
        checked.add(kind)
        return packed

    for layer in model.decoder.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and can_pack(child.weight):
                    packed = pack(child)
                    if packed is None:
                        return count
                    setattr(parent, name, packed)
                    if release is not None:
                        release(child.weight)
                    count += 1
    if head and type(model.lm.lm_head) is nn.Linear and can_pack(model.lm.lm_head.weight):
        packed = pack(model.lm.lm_head)
        if packed is not None:
            model.lm.lm_head = packed
            count += 1
    return count
