"""Tiny random models and a locally built OPT-like tokenizer: for tests and the `--tiny` smoke
mode. Nothing is downloaded; answers are meaningless but every code path runs.

The tiny encoders take the same inputs as the real ones (224 px images and frames, 1024 x 128
fbanks), so the media layer and the pipeline run unchanged on them.
"""

from __future__ import annotations

import copy
import functools
import zlib
from dataclasses import replace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import ASTConfig, ASTModel, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, TimesformerConfig, TimesformerModel
from timm.models.vision_transformer import VisionTransformer

from .encoders import Encoder, wrap_encoder
from .hub import Progress, fetch, is_cached, read_adapter
from .model import Adapter, InjectionConfig
from .tasks import EncoderRef, ModelRef, Task

TINY_WIDTH = 32  # hidden size of the tiny LM and encoders
TOKENIZER_VOCAB = 500  # byte-level BPE: 256 bytes + 4 specials + merges

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
        vocab_size=TOKENIZER_VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_CORPUS.split("\n"), trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="right"
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
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(**config)).eval()


def tiny_encoder(modality: str, seed: int = 0) -> Encoder:
    """A random 4-block encoder of the given modality with the real models' input sizes."""
    torch.manual_seed(seed)
    if modality == "image":
        model = VisionTransformer(img_size=224, patch_size=32, embed_dim=TINY_WIDTH, depth=4, num_heads=2, num_classes=0)
    elif modality == "video":
        config = TimesformerConfig(
            image_size=224, patch_size=32, num_frames=8, hidden_size=TINY_WIDTH, num_hidden_layers=4,
            num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6, attn_implementation="eager",
        )
        model = TimesformerModel(config)
    elif modality == "audio":
        config = ASTConfig(
            hidden_size=TINY_WIDTH, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6,
            max_length=1024, num_mel_bins=128, attn_implementation="eager",
        )
        model = ASTModel(config)
    else:
        raise ValueError(f"unknown modality {modality!r}")
    return wrap_encoder(model.eval())


TINY_INJECTION = InjectionConfig(start_layer=2, end_layer=5, num_features=3, prompt_len=4, prompt_mlp=True)


def tiny_adapter(injection: InjectionConfig = TINY_INJECTION, seed: int = 0) -> Adapter:
    """Random connectors and prompt for the tiny encoders and LM, scaled to move the LM visibly."""
    torch.manual_seed(seed)
    adapter = Adapter(injection, TINY_WIDTH, TINY_WIDTH, TINY_WIDTH)
    with torch.no_grad():
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

    def lm(self, ref: ModelRef, dtype: torch.dtype) -> tuple[OPTForCausalLM, PreTrainedTokenizerFast]:
        # a copy, as a fresh load would be: the pipeline adds the registry's answer tokens to it
        return tiny_lm(seed=zlib.crc32(ref.id.encode()) % 1000).to(dtype), copy.deepcopy(tiny_tokenizer())

    def encoder(self, ref: EncoderRef, modality: str, dtype: torch.dtype) -> Encoder:
        return tiny_encoder(modality, seed=zlib.crc32(ref.id.encode()) % 1000).to(dtype)

    def adapter_state(self, task: Task, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        if self.adapter_files:
            return read_adapter(fetch(task.adapter, progress))
        return tiny_adapter(task.injection, seed=zlib.crc32(task.id.encode())).state_dict()

    def cached(self, task: Task) -> dict[str, bool]:
        return {"adapter": is_cached(task.adapter) if self.adapter_files else True, "lm": True, "encoder": True}
