"""What the benchmark measures: OPT shapes, encoder sizes and inputs, built with random weights by
the library's own builders (`epalm.tiny.random_lm`, `epalm.encoders.build_encoder`,
`epalm.tiny.tiny_adapter`), with the injection settings and tasks of the registry
(`checkpoints/tasks.yaml`). Nothing is downloaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import OPTConfig, OPTForCausalLM

from epalm.encoders import Encoder, build_encoder
from epalm.model import Adapter, InjectionConfig
from epalm.tasks import EncoderRef, ModelRef, Task, load_registry
from epalm.tiny import random_lm, tiny_adapter, tiny_tokenizer

# The architectures of the Hub's OPT configs (what `from_pretrained` would read), by the name in
# the registry's LM id (facebook/<name>); "tiny" is for tests.
_OPT_COMMON = dict(vocab_size=50272, max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=2)
LM_SHAPES: dict[str, dict] = {
    "opt-6.7b": dict(
        hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32, word_embed_proj_dim=4096
    ),
    "opt-2.7b": dict(
        hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32, word_embed_proj_dim=2560
    ),
    "opt-350m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        ffn_dim=4096,
        num_attention_heads=16,
        word_embed_proj_dim=512,
        do_layer_norm_before=False,
    ),
    "opt-125m": dict(
        hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, word_embed_proj_dim=768
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=6,
        ffn_dim=128,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        vocab_size=512,
        max_position_embeddings=128,
    ),
}
BASE_LM = "facebook/opt-2.7b"  # the LM of the paper's base adapters

# Encoder sizes: "real" = the registry's encoders of the base tasks (ViT-B, TimeSformer-B, AST-B);
# "small" = the same architectures narrower and shallower (--quick); "tiny" = tests. Specs are
# `build_encoder(library, class, config)` arguments.
ENCODER_FAMILIES = ("real", "small", "tiny")
_ENCODER_SPECS: dict[str, dict[str, tuple[str, str, dict]]] = {
    "small": {
        "image": ("timm", "vit_small_patch16_224", dict(num_classes=0)),
        "video": (
            "transformers",
            "TimesformerModel",
            dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
        ),
        "audio": (
            "transformers",
            "ASTModel",
            dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
        ),
    },
    "tiny": {
        "image": (
            "timm",
            "VisionTransformer",
            dict(img_size=224, patch_size=32, embed_dim=32, depth=6, num_heads=2, num_classes=0),
        ),
        "video": (
            "transformers",
            "TimesformerModel",
            dict(patch_size=32, hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64),
        ),
        "audio": (
            "transformers",
            "ASTModel",
            dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64),
        ),
    },
}
_TRANSFORMERS_ENCODERS = {"video": "TimesformerModel", "audio": "ASTModel"}
ENCODER_WIDTHS = {"real": 768, "small": 384, "tiny": 32}  # ViT-B/16, TimeSformer-B and AST-B are 768 wide

# Inputs: name -> (encoder modality, frames). `--modalities video` measures 8 and 16 frames.
INPUTS = {"image": ("image", None), "video8": ("video", 8), "video16": ("video", 16), "audio": ("audio", None)}
MODALITY_INPUTS = {"image": ["image"], "video": ["video8", "video16"], "audio": ["audio"]}


@dataclass(frozen=True)
class BenchTask:
    """A registry task as the benchmark builds it: its injection moved onto the measured LM's depth."""

    id: str
    modality: str
    injection: InjectionConfig


def lm_config(name: str) -> OPTConfig:
    return OPTConfig(**{**_OPT_COMMON, **LM_SHAPES[name]}, attn_implementation="eager")


def build_lm(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> OPTForCausalLM:
    """OPT at a named shape with random weights (built in place, in `dtype`)."""
    return random_lm(lm_config(name), dtype, device, seed)


def _registry_tasks(lm_id: str) -> list[Task]:
    return [task for task in load_registry().values() if task.lm.id == lm_id]


def at_depth(injection: InjectionConfig, from_layers: int, to_layers: int) -> InjectionConfig:
    """An injection set for a `from_layers`-deep LM moved onto a `to_layers`-deep one: as many layers
    after `end` and the same span, shortened where the LM is too shallow."""
    end = max(1, to_layers - (from_layers - injection.end_layer))
    return replace(injection, start_layer=max(0, end - (injection.end_layer - injection.start_layer)), end_layer=end)


def injection_for(lm_name: str) -> InjectionConfig:
    """The registry's injection for this LM (OPT-6.7B: the pt_L adapters'), or for other shapes the
    base adapters' (OPT-2.7B: layers 19..30 of 32) moved onto the LM's depth."""
    own = _registry_tasks(f"facebook/{lm_name}")
    task = own[0] if own else _registry_tasks(BASE_LM)[0]
    depth = LM_SHAPES[task.lm.id.split("/")[-1]]["num_hidden_layers"]
    return at_depth(task.injection, depth, LM_SHAPES[lm_name]["num_hidden_layers"])


def base_tasks(lm_name: str) -> list[BenchTask]:
    """The registry's tasks on OPT-2.7B (the base adapters), their injection on this LM's depth."""
    depth, layers = LM_SHAPES[BASE_LM.split("/")[-1]]["num_hidden_layers"], LM_SHAPES[lm_name]["num_hidden_layers"]
    return [BenchTask(t.id, t.modality, at_depth(t.injection, depth, layers)) for t in _registry_tasks(BASE_LM)]


def encoder_spec(family: str, modality: str) -> tuple[str, str, dict]:
    """`build_encoder` arguments; "real" reads the registry's encoder of the modality's base tasks."""
    if family != "real":
        return _ENCODER_SPECS[family][modality]
    ref = next(t.encoder for t in _registry_tasks(BASE_LM) if t.modality == modality)
    if ref.library == "timm":  # a timm name with its pretrained tag: the architecture is the name
        return "timm", ref.id.split(".")[0], {"num_classes": 0, **dict(ref.config)}
    return "transformers", _TRANSFORMERS_ENCODERS[modality], dict(ref.config)


def build_encoder_for(family: str, modality: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Encoder:
    with torch.random.fork_rng(devices=[]):  # the caller's RNG untouched
        torch.manual_seed(seed)
        encoder = build_encoder(*encoder_spec(family, modality))
    return encoder.to(device=device, dtype=dtype).eval()


def build_adapter(
    injection: InjectionConfig,
    encoder_dim: int,
    lm: OPTForCausalLM,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> Adapter:
    config = lm.config
    adapter = tiny_adapter(injection, seed, encoder_dim, config.hidden_size, config.word_embed_proj_dim)
    return adapter.to(device=device, dtype=dtype).requires_grad_(False)


def encoder_input(name: str, batch: int, dtype: torch.dtype, device: torch.device, encoder: Encoder) -> torch.Tensor:
    modality, frames = INPUTS[name]
    generator = torch.Generator().manual_seed(1)
    if modality == "image":
        shape = (batch, 3, 224, 224)
    elif modality == "video":
        shape = (batch, frames, 3, 224, 224)
    else:
        config = encoder.model.config
        shape = (batch, config.max_length, config.num_mel_bins)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters, each counted once (the head is tied to the embedding)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def decode_weight_bytes(lm: OPTForCausalLM) -> int:
    """Bytes of weights one decode step must read: every decoder weight plus the (tied) head;
    the position embeddings are looked up (one row), not read."""
    return param_bytes(lm) - param_bytes(lm.model.decoder.embed_positions)


def weight_bytes_estimate(name: str, dtype: torch.dtype) -> int:
    """The decoder layers' and the embedding's weights, before building (does it fit in memory?)."""
    c = lm_config(name)
    h, f = c.hidden_size, c.ffn_dim
    count = c.num_hidden_layers * (4 * h * h + 2 * h * f) + c.vocab_size * c.word_embed_proj_dim
    return count * torch.tensor([], dtype=dtype).element_size()


class RandomSource:
    """A `store.ModelSource` for `epalm.Pipeline`: random weights at a measured shape (the builders
    above), the registry's tasks with their injection moved onto the LM's depth, encoders of one
    family, the tiny tokenizer (a copy per LM: the store adds the answer tokens to it)."""

    random_weights = True
    stand_in = "random weights"

    def __init__(self, lm_name: str = "opt-2.7b", encoders: str = "real") -> None:
        self.lm_name, self.encoders = lm_name, encoders
        self.injection = injection_for(lm_name)

    def tasks(self, registry: dict[str, Task]) -> dict[str, Task]:
        layers = {"start_layer": self.injection.start_layer, "end_layer": self.injection.end_layer}
        return {
            task_id: replace(task, injection=replace(task.injection, **layers)) for task_id, task in registry.items()
        }

    def lm(self, ref: ModelRef, dtype: torch.dtype, progress: Any = None) -> tuple[OPTForCausalLM, Any]:
        return build_lm(self.lm_name, dtype, torch.device("cpu")), copy.deepcopy(tiny_tokenizer())

    def encoder(self, ref: EncoderRef, modality: str, dtype: torch.dtype, progress: Any = None) -> Encoder:
        return build_encoder_for(self.encoders, modality, dtype, torch.device("cpu"))

    def adapter_state(self, task: Task, progress: Any = None) -> dict[str, torch.Tensor]:
        config = lm_config(self.lm_name)
        width = ENCODER_WIDTHS[self.encoders]
        return tiny_adapter(task.injection, 1, width, config.hidden_size, config.word_embed_proj_dim).state_dict()

    def resolve(self, task: Task, parts: Any) -> int:
        return 0  # nothing to download
