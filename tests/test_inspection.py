"""What the model saw and how sure it was: exact encoder inputs, prompts, token probabilities, beams."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from epalm.answers import answers
from epalm.decoding import DecodingOptions
from epalm.engine import generate
from epalm.image import CLIP_MEAN, CLIP_STD
from epalm.inspection import Inspector
from epalm.pipeline import Pipeline
from epalm.video import frame_indices

from conftest import write_video, write_wav

FAST = dict(preset="fast", inspect=True)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(device="cpu", tiny=True, feature_cache=0)  # the tests read every encoder input


def encoder_inputs(pipe: Pipeline, task: str) -> list[torch.Tensor]:
    """Every input the task's encoder receives from now on."""
    seen: list[torch.Tensor] = []
    pipe.encoder(pipe.task(task)).register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen


def renormalise(pixels: np.ndarray) -> torch.Tensor:
    """A seen uint8 image normalised again, as the image transform does."""
    return TF.normalize(TF.to_tensor(Image.fromarray(pixels)), CLIP_MEAN, CLIP_STD)


def test_the_seen_image_is_exactly_what_the_encoder_received(pipe, tmp_path):
    rgba = np.random.default_rng(1).integers(0, 255, (90, 160, 4), dtype=np.uint8)  # transparent, not square
    Image.fromarray(rgba, "RGBA").save(tmp_path / "wide.png")
    received = encoder_inputs(pipe, "image-caption")
    answer = pipe.caption(tmp_path / "wide.png", "image-caption", max_new_tokens=3, **FAST)
    seen = answer.inspection.seen
    assert seen.modality == "image" and seen.source_size == (160, 90) and len(seen.images) == 1
    assert seen.images[0].shape == (224, 224, 3) and seen.images[0].dtype == np.uint8
    assert torch.equal(renormalise(seen.images[0]), received[-1][0]), "same pixels as the encoder's input"
    assert "160×90" in seen.captions[0] and "aspect ratio not kept" in seen.captions[0]


def test_the_seen_frames_are_exactly_what_the_encoder_received(pipe, tmp_path):
    clip = write_video(tmp_path / "clip.mp4", frames=20, fps=10)
    received = encoder_inputs(pipe, "video-qa-msvd")
    answer = pipe.answer(clip, "what happens", "video-qa-msvd", max_new_tokens=3, **FAST)
    seen = answer.inspection.seen
    frames = received[-1][0]
    assert len(seen.images) == len(frames) == 8
    for image, frame in zip(seen.images, frames):
        assert torch.equal(renormalise(image), frame)
    assert seen.frame_indices == frame_indices(8, 20)
    assert seen.timestamps == pytest.approx([i / 10 for i in seen.frame_indices])
    assert seen.duration == pytest.approx(2.0, abs=0.15)
    assert seen.captions[1] == f"{seen.timestamps[1]:.2f} s (frame {seen.frame_indices[1]})"


@pytest.mark.parametrize(
    "seconds, cut, padded, opened",
    [(1.0, False, True, False), (12.0, True, False, False), (12.0, True, False, True)],
    ids=["short", "long", "long-file-object"],
)
def test_the_seen_spectrogram_says_what_was_cut_or_padded(pipe, tmp_path, seconds, cut, padded, opened):
    received = encoder_inputs(pipe, "audio-caption")
    path = write_wav(tmp_path / "tone.wav", seconds=seconds)
    with open(path, "rb") as file:  # a file object is read once, though the clip's length is read after the window
        answer = pipe.caption(file if opened else path, "audio-caption", max_new_tokens=2, **FAST)
    seen = answer.inspection.seen
    assert np.array_equal(seen.spectrogram, received[-1][0].numpy())
    assert seen.images[0].shape == (256, 1024, 3), "128 mel bins drawn 2 px tall, 1024 frames wide"
    assert (seen.cut, seen.padded) == (cut, padded)
    assert seen.heard_seconds == pytest.approx(min(seconds, 10.255), abs=1e-3)
    assert seen.duration == pytest.approx(seconds, abs=0.01)
    assert ("cut" in seen.captions[0]) == cut and ("padded" in seen.captions[0]) == padded


def test_the_prompt_shows_the_soft_prompt_and_the_question_format(pipe, media_files):
    vqa = pipe.answer(media_files["image"], "what is it", "image-vqa", max_new_tokens=2, **FAST)
    caption = pipe.caption(media_files["image"], "image-caption", max_new_tokens=2, **FAST)
    prompt_len = pipe.task("image-vqa").injection.prompt_len
    assert vqa.inspection.prompt == f"[P×{prompt_len}]</s>what is it??</a>"
    assert caption.inspection.prompt == f"[P×{prompt_len}]</s>"
    injection = pipe.task("image-vqa").injection
    assert f"last {injection.num_features} blocks" in vqa.inspection.injection
    assert f"layers {injection.start_layer}–{injection.end_layer - 1}" in vqa.inspection.injection


@pytest.mark.parametrize("preset", ["paper", "fast", "sampling"])
def test_inspecting_changes_nothing_and_is_off_by_default(pipe, media_files, preset):
    settings = dict(preset=preset, seed=3, max_new_tokens=8)
    plain = list(answers(pipe.stream(media_files["image"], "image-caption", **settings)))
    inspected = list(answers(pipe.stream(media_files["image"], "image-caption", **settings, inspect=True)))
    assert [a.text for a in plain] == [a.text for a in inspected]
    assert all(a.inspection is None for a in plain)
    assert all(a.inspection.seen is inspected[-1].inspection.seen for a in inspected), "partials show the media too"


def test_greedy_token_probabilities_are_the_models(pipe, media_files):
    task = pipe.task("image-vqa")
    received = encoder_inputs(pipe, "image-vqa")
    answer = pipe.answer(media_files["image"], "what color", "image-vqa", max_new_tokens=6, **FAST)
    tokens = answer.inspection.tokens
    lm, tokenizer = pipe.lm(task)
    prompt = [tokenizer.bos_token_id] + tokenizer(task.text.render("what color"), add_special_tokens=False).input_ids
    with torch.inference_mode():
        prefix = pipe.adapter(task).prefix(pipe.encoder(task)(received[-1], task.injection.num_features))
    for step, token in enumerate(tokens):
        # the original, uncached: the whole sequence so far, every step (the late layers' visual state
        # reads the whole sequence, so one forward over the final ids would not give each step's logits)
        ids = torch.tensor([prompt + [t.id for t in tokens[:step]]])
        with torch.inference_mode():
            expected = torch.softmax(lm(ids, torch.ones_like(ids), prefix)[0, -1].float(), -1)
        assert token.prob == pytest.approx(expected[token.id].item(), abs=1e-5)
        assert token.id == expected.argmax().item(), "greedy takes the most likely token"
    assert tokenizer.decode([t.id for t in tokens], skip_special_tokens=True).strip() == answer.text
    assert answer.inspection.decoding == {"strategy": "greedy", "max_new_tokens": 6}


def test_beams_are_ranked_and_their_scores_add_up(pipe, media_files):
    answer = pipe.caption(media_files["video"], "video-caption", max_length=14, inspect=True)
    inspection = answer.inspection
    beams = inspection.beams
    assert len(beams) == 3 and beams[0].text == answer.text and inspection.tokens == beams[0].tokens
    assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
    for beam in beams:
        stopped = beam.tokens[-1].text == "</s>"
        length = 1 + len(beam.tokens) - stopped  # BOS and the new tokens, the EOS not counted (transformers 4.24)
        assert beam.score == pytest.approx(sum(t.logprob for t in beam.tokens) / length, abs=1e-5)
        assert beam.logprob == pytest.approx(sum(t.logprob for t in beam.tokens))
    assert inspection.decoding == {
        "strategy": "beam search",
        "num_beams": 3,
        "length_penalty": 1.0,
        "max_length": 14,
        "min_answer_tokens": 20,
    }


def test_sampling_reports_its_settings(pipe, media_files):
    settings = {**FAST, "preset": "sampling", "seed": 5, "max_new_tokens": 4}
    answer = pipe.caption(media_files["image"], "image-caption", **settings)
    assert answer.inspection.decoding == {
        "strategy": "sampling",
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 0,
        "seed": 5,
        "max_new_tokens": 4,
    }
    assert all(0 < t.prob <= 1 for t in answer.inspection.tokens) and len(answer.inspection.tokens) >= 1


def test_a_trace_does_not_change_beam_search():
    from epalm.model import EPALM
    from epalm.tiny import tiny_adapter, tiny_lm

    lm, adapter = EPALM(tiny_lm(seed=2)), tiny_adapter(seed=2)
    prefix = adapter.prefix(torch.randn(3, 1, 32))
    ids = torch.tensor([[2, 40, 41]])
    options = DecodingOptions(num_beams=4, max_length=16)
    inspector = Inspector(None)
    with torch.inference_mode():
        plain = generate(lm, prefix, ids, torch.ones_like(ids), options)
        traced = generate(lm, prefix, ids, torch.ones_like(ids), options, trace=inspector.trace)
    assert torch.equal(plain.sequences, traced.sequences) and torch.equal(plain.sequence_scores, traced.sequence_scores)
    assert len(inspector.steps) >= 1 and inspector.steps[0][1].shape[0] == 4


def test_save_writes_the_pictures_and_the_json(pipe, media_files, tmp_path):
    answer = pipe.caption(media_files["video"], "video-caption", max_new_tokens=3, **FAST)
    paths = answer.inspection.save(tmp_path / "out", answer.text)
    assert [p.name for p in paths] == [f"frame{i:02d}.png" for i in range(1, 17)] + ["inspection.json"]
    assert np.array_equal(np.asarray(Image.open(paths[3])), answer.inspection.seen.images[3])
    data = json.loads(paths[-1].read_text())
    assert data["answer"] == answer.text and data["prompt"].startswith("[P×")
    assert data["seen"]["files"][0] == "frame01.png" and len(data["seen"]["timestamps"]) == 16
    assert [t["id"] for t in data["tokens"]] == [t.id for t in answer.inspection.tokens]


def test_describe_says_it_all_in_markdown_that_shows_text_as_typed(pipe, media_files):
    answer = pipe.answer(media_files["image"], "is *this* `it` | <b>?", "image-vqa", max_length=24, inspect=True)
    text = answer.inspection.describe()
    assert "**Input:** The 64×48 image, resized to 224×224" in text
    assert (
        "<code>&#91;P×4&#93;&lt;/s&gt;is&nbsp;&#42;this&#42;&nbsp;&#96;it&#96;&nbsp;|&nbsp;&lt;b&gt;??&lt;/a&gt;</code>"
        in text
    )
    assert "**Decoding:** beam search · num beams 3 · length penalty 1.0 · max length 24 · min answer tokens 8" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3 and table[1].startswith(f"| 1 | {answer.text.split()[0]}")
    assert text.count("<code>") == 2 + len(answer.inspection.tokens)


def test_each_response_gets_a_new_folder_and_old_ones_are_deleted(tmp_path):
    import os
    import time

    from epalm.inspection import response_folder

    old, recent = tmp_path / "old", tmp_path / "recent"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "input.png").write_bytes(b"png")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    first, second = response_folder(tmp_path, 3600), response_folder(tmp_path, 3600)
    assert not old.exists() and recent.exists(), "only folders older than an hour go"
    assert first != second and first.parent == tmp_path and not first.exists(), "a new, unused path each time"
