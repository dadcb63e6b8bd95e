"""Tiny random models and a locally built OPT-like tokenizer: for tests and the `--tiny` smoke
mode. Nothing is downloaded; answers are meaningless but every code path runs. The builders take
shape overrides too, and `random_lm` builds an OPT of any size quickly: the benchmark measures the
real shapes with them.

The tiny encoders take the same inputs as the real ones (224 px images and frames, 1024 x 128
fbanks), so the media layer and the pipeline run unchanged on them.
"""

from __future__ import annotations

import copy
import functools
import zlib
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    ASTConfig,
    ASTModel,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    TimesformerConfig,
    TimesformerModel,
)

from .adapter_format import read_adapter
from .encoders import Encoder, wrap_encoder
from .errors import Progress
from .hub import adapter_files, check, fetch, fetch_and_read
from .model import Adapter, InjectionConfig
from .refs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EncoderRef, ModelRef
from .tasks import Task

TINY_WIDTH = 32  # hidden size of the tiny LM and encoders
TOKENIZER_VOCAB = 500  # byte-level BPE: 256 bytes + 4 specials + merges
# Weight scales that let a tiny adapter steer the tiny LM, as a real adapter steers OPT. With OPT's
# init_std 0.02 at width 32 the logits stay within about ±0.1 and the layers barely pass anything
# on, so no adapter can make the LM say anything. With these, next-token logits spread over several
# units (std ~4) as a real OPT's do, and the default training recipe learns the synthetic tasks of
# tests/test_training.py (every modality) to a held-out exact match of 1.0.
TINY_INIT_STD = 0.35  # every linear layer
TINY_EMBED_STD = 0.7  # token embeddings and the tied LM head: confident next tokens

_CORPUS = """
a man riding a wave on top of a surfboard. a cat sitting on a couch next to a remote control.
two dogs playing with a frisbee in the grass. a plate of food with broccoli and rice.
a person is talking about a car. a woman is singing a song on stage. what is the man holding?
what color is the cat? how many people are in the picture? is there a dog in the image?
a bird is chirping while cars pass by. music plays and a crowd cheers. water is running.
the astronaut stands in front of a flag. a cup of coffee on a table. a rocket on the launch pad.
yes no one two three red blue green white black a the of in on with and is are what where who
"""


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that behaves like OPT's: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3,
    `</s>` prepended to every sequence as BOS, right padding. Answer tokens (`</a>`) are added by
    the pipeline from the registry, to a copy (see `TinyModels.lm`)."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.split("\n"), trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )
    return tokenizer


def tiny_lm(seed: int = 0, **overrides: object) -> OPTForCausalLM:
    """A 6-layer OPT with a vocabulary that covers the tiny tokenizer and a few added tokens (`</a>`)."""
    config = dict(
        vocab_size=TOKENIZER_VOCAB + 1,  # fixed, so the weights do not depend on the tokens a pipeline adds
        hidden_size=TINY_WIDTH,
        word_embed_proj_dim=TINY_WIDTH,
        num_hidden_layers=6,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        attn_implementation="eager",
        init_std=TINY_INIT_STD,
    )
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):  # the same weights in every process, the caller's RNG untouched
        torch.manual_seed(seed)
        lm = OPTForCausalLM(OPTConfig(**config)).eval()
        with torch.no_grad():
            lm.model.decoder.embed_tokens.weight.normal_(0, TINY_EMBED_STD)  # tied: the LM head too
        return lm


class _RandomPool:
    """N(0, std) numbers drawn once and copied into tensors at shifting offsets: random-looking
    weights at memory speed (drawing billions of them with torch's `normal_` is compute-bound)."""

    def __init__(self, std: float, seed: int, device: torch.device, size: int = 1 << 24) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(size, generator=generator) * std).to(device)
        self.offset = 0

    def fill_(self, tensor: torch.Tensor) -> None:
        flat, size, done = tensor.view(-1), len(self.pool), 0
        while done < flat.numel():
            start = self.offset % size
            n = min(size - start, flat.numel() - done)
            flat[done : done + n].copy_(self.pool[start : start + n])
            done += n
            self.offset += n + 7919  # a prime stride: consecutive tensors do not line up
        self.offset = (self.offset * 31 + 104729) % size


@torch.no_grad()
def random_lm(
    config: OPTConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> OPTForCausalLM:
    """An OPT of any shape with random weights as OPT initialises them (matrices ~ N(0, init_std),
    biases 0, LayerNorm weights 1), built on the meta device and filled in place: no float32 copy
    when another dtype is asked for, and no slow per-module initialisation."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            lm = OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    lm.to_empty(device=device)
    lm.tie_weights()  # to_empty unties lm_head from embed_tokens
    pool = _RandomPool(config.init_std, seed, torch.device(device))
    for name, param in lm.named_parameters():
        if param.ndim >= 2:
            pool.fill_(param)
        elif "layer_norm" in name and name.endswith("weight"):
            param.fill_(1.0)
        else:
            param.zero_()
    return lm.eval().requires_grad_(False)


def tiny_encoder(modality: str, seed: int = 0) -> Encoder:
    """A random 4-block encoder of the given modality with the real models' input sizes."""
    with torch.random.fork_rng(devices=[]):  # the caller's RNG untouched
        torch.manual_seed(seed)
        return wrap_encoder(_tiny_encoder_model(modality).eval())


def _tiny_encoder_model(modality: str) -> torch.nn.Module:
    if modality == "image":
        model = VisionTransformer(
            img_size=224, patch_size=32, embed_dim=TINY_WIDTH, depth=4, num_heads=2, num_classes=0
        )
    elif modality == "video":
        config = TimesformerConfig(
            image_size=224,
            patch_size=32,
            num_frames=8,
            hidden_size=TINY_WIDTH,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            layer_norm_eps=1e-6,
            attn_implementation="eager",
        )
        model = TimesformerModel(config)
    elif modality == "audio":
        config = ASTConfig(
            hidden_size=TINY_WIDTH,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            layer_norm_eps=1e-6,
            max_length=1024,
            num_mel_bins=128,
            attn_implementation="eager",
            patch_size=32,
            frequency_stride=32,
            time_stride=32,  # 128 patches, not 1212: 40x faster, still distinct
            initializer_range=0.5,  # at 0.02 the [CLS] of a random AST is the same for any sound
        )
        model = ASTModel(config)
    else:
        raise ValueError(f"unknown modality {modality!r}")
    return model


TINY_INJECTION = InjectionConfig(start_layer=2, end_layer=5, num_features=3, prompt_len=4, prompt_mlp=True)


def tiny_adapter(
    injection: InjectionConfig = TINY_INJECTION,
    seed: int = 0,
    encoder_dim: int = TINY_WIDTH,
    hidden_size: int = TINY_WIDTH,
    embed_dim: int = TINY_WIDTH,
) -> Adapter:
    """Random connectors and prompt (for the tiny encoders and LM unless other widths are given),
    scaled to move the LM visibly."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's RNG untouched
        torch.manual_seed(seed)
        adapter = Adapter(injection, encoder_dim, hidden_size, embed_dim)
        for linear in adapter.connector:
            linear.weight.normal_(0, 0.5)
    return adapter.eval()


class TinyModels:
    """The model source of `--tiny` (a `store.ModelSource`): tiny random models, nothing downloaded.

    Every task keeps its shared-connector and prompt-MLP settings but injects into the tiny LM's
    layers. Adapters are random, seeded by the task id, so answers are stable but meaningless; with
    `adapter_files`, each task's adapter file is read instead (Hub or local path, as the real
    source does): an adapter trained on the tiny models, or a test of the download path.
    """

    random_weights = True
    stand_in = "tiny random stand-in"

    def __init__(self, adapter_files: bool = False) -> None:
        self.adapter_files = adapter_files

    def tasks(self, registry: dict[str, Task]) -> dict[str, Task]:
        return {task_id: self._adapt(task) for task_id, task in registry.items()}

    @staticmethod
    def _adapt(task: Task) -> Task:
        injection = replace(
            TINY_INJECTION, shared_connector=task.injection.shared_connector, prompt_mlp=task.injection.prompt_mlp
        )
        return replace(task, injection=injection)

    def lm(
        self, ref: ModelRef, dtype: torch.dtype, progress: Progress | None = None
    ) -> tuple[OPTForCausalLM, PreTrainedTokenizerFast]:
        # a copy, as a fresh load would be: the store adds the registry's answer tokens to it
        return tiny_lm(seed=zlib.crc32(ref.id.encode()) % 1000).to(dtype), copy.deepcopy(tiny_tokenizer())

    def encoder(self, ref: EncoderRef, modality: str, dtype: torch.dtype, progress: Progress | None = None) -> Encoder:
        return tiny_encoder(modality, seed=zlib.crc32(ref.id.encode()) % 1000).to(dtype)

    def adapter_state(self, task: Task, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        """Random; or, with `adapter_files` or for an adapter of our format (a local folder, or a Hub
        repo's `adapter.safetensors`: trained on these tiny models, as `Pipeline.use_adapter` checks),
        the file's weights."""
        if self._reads_file(task):
            return fetch_and_read(task.adapter, read_adapter, progress, task.id)
        return tiny_adapter(task.injection, seed=zlib.crc32(task.id.encode())).state_dict()

    def _reads_file(self, task: Task) -> bool:
        source = task.adapter
        if self.adapter_files:
            return True
        return (
            source.filename == ADAPTER_WEIGHTS if source.repo_id else (Path(source.filename) / ADAPTER_CONFIG).is_file()
        )

    def resolve(self, task: Task, parts: Collection[str]) -> int:
        """Only an adapter read from a file has anything to check (as the real source checks it)."""
        if "adapter" not in parts or not self._reads_file(task):
            return 0
        files = adapter_files(task.adapter, task.id)
        if files is None:
            fetch(task.adapter, task_id=task.id)  # a local file: checks it is there
            return 0
        return check(files)
