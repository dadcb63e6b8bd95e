"""Tiny random models and a locally built OPT-like tokenizer: for tests and the `--tiny` smoke
mode. Nothing is downloaded; answers are meaningless but every code path runs.

The tiny encoders take the same inputs as the real ones (224 px images and frames, 1024 x 128
fbanks), so the media layer and the pipeline run unchanged on them.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import ASTConfig, ASTModel, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, TimesformerConfig, TimesformerModel
from timm.models.vision_transformer import VisionTransformer

from .encoders import Encoder, wrap_encoder
from .model import Adapter, InjectionConfig

TOKENIZER_VOCAB = 500  # byte-level BPE: 256 bytes + 4 specials + merges
ANSWER_TOKEN = "</a>"

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
    `</s>` prepended to every sequence as BOS, right padding, `</a>` an added special token."""
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
    tokenizer.add_special_tokens({"additional_special_tokens": [ANSWER_TOKEN]})
    return tokenizer


def tiny_lm(seed: int = 0, **overrides: object) -> OPTForCausalLM:
    """A 6-layer OPT with a vocabulary that covers the tiny tokenizer (and `</a>`)."""
    config = dict(
        vocab_size=len(tiny_tokenizer()) + 8,
        hidden_size=32,
        word_embed_proj_dim=32,
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
        model = VisionTransformer(img_size=224, patch_size=32, embed_dim=32, depth=4, num_heads=2, num_classes=0)
    elif modality == "video":
        config = TimesformerConfig(
            image_size=224, patch_size=32, num_frames=8, hidden_size=32, num_hidden_layers=4,
            num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6, attn_implementation="eager",
        )
        model = TimesformerModel(config)
    elif modality == "audio":
        config = ASTConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6,
            max_length=1024, num_mel_bins=128, attn_implementation="eager",
        )
        model = ASTModel(config)
    else:
        raise ValueError(f"unknown modality {modality!r}")
    return wrap_encoder(model.eval())


TINY_INJECTION = InjectionConfig(start_layer=2, end_layer=5, num_features=3, prompt_len=4, prompt_mlp=True)


def tiny_adapter(encoder: Encoder, lm: OPTForCausalLM, injection: InjectionConfig = TINY_INJECTION, seed: int = 0) -> Adapter:
    """Random connectors and prompt sized for `encoder` and `lm`, scaled to move the LM visibly."""
    torch.manual_seed(seed)
    adapter = Adapter(injection, encoder.dim, lm.config.hidden_size, lm.config.word_embed_proj_dim)
    with torch.no_grad():
        for linear in adapter.connector:
            linear.weight.normal_(0, 0.5)
    return adapter.eval()
