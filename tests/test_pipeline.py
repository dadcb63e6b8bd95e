"""The shared pipeline: one LM and encoder per id, per-call adapters, streaming, errors."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from epalm.hub import WeightsUnavailable
from epalm.media import MediaError
from epalm.pipeline import InputError, OutOfMemory, Pipeline
from epalm.tiny import TinyModels


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(device="cpu", tiny=True)


@pytest.mark.parametrize(
    "task, modality, question",
    [("image-caption", "image", None), ("image-vqa", "image", "what is this"), ("video-caption", "video", None),
     ("video-qa-msvd", "video", "what happens"), ("audio-caption", "audio", None)],
)
def test_every_modality_answers(pipe, media_files, task, modality, question):
    result = pipe.stream(media_files[modality], task, question, preset="fast", max_new_tokens=6, max_length=None)
    answers = list(result)
    final = answers[-1]
    assert final.done and final.task == task and isinstance(final.text, str)
    assert final.timings.new_tokens >= 1 and final.timings.encode_s > 0 and final.timings.first_token_s > 0
    assert all(not a.done for a in answers[:-1])


def test_paper_preset_is_the_default_and_is_beam_search(pipe, media_files):
    answers = list(pipe.stream(media_files["image"], "image-caption"))
    assert len(answers) == 1 and answers[0].done, "beam search shows only the final answer"
    assert pipe.decoding_options(pipe.task("image-caption")).num_beams == 3


def test_streaming_gives_growing_prefixes_ending_in_the_final_text(pipe, media_files):
    parts = [a.text for a in pipe.stream(media_files["image"], "image-caption", preset="fast", max_new_tokens=12, max_length=None)]
    assert len(parts) >= 3
    assert all(b.startswith(a) for a, b in zip(parts[:-2], parts[1:-1]))
    assert parts[-1] == parts[-2] or parts[-1].startswith(parts[-2])
    whole = pipe.caption(media_files["image"], "image-caption", preset="fast", max_new_tokens=12, max_length=None)
    assert whole.text == parts[-1]


def test_tasks_sharing_an_lm_share_one_object():
    pipe = Pipeline(device="cpu", tiny=True)
    vqa, caption, audio = (pipe.task(t) for t in ("image-vqa", "image-caption", "audio-caption"))
    lm = pipe.lm(vqa)[0]
    params_before = sum(p.numel() for p in lm.parameters())
    for task in (vqa, caption, audio):
        pipe.adapter(task)
    assert pipe.lm(caption)[0] is lm and pipe.lm(audio)[0] is lm
    assert pipe.encoder(vqa) is pipe.encoder(caption)
    assert sum(1 for name in pipe.loaded() if "language model" in name) == 1
    assert sum(p.numel() for p in lm.parameters()) == params_before, "adapters are not added to the LM"
    assert sum(p.numel() for p in pipe.adapter(caption).parameters()) < params_before


def test_concurrent_calls_for_different_tasks_do_not_mix_adapters(media_files):
    pipe = Pipeline(device="cpu", tiny=True)
    jobs = [("image-caption", None), ("image-vqa", "what is it"), ("image-gqa", "where is it"), ("image-caption", None)]
    settings = dict(preset="fast", max_new_tokens=8, max_length=None)
    alone = [list(pipe.stream(media_files["image"], t, q, **settings))[-1].text for t, q in jobs]
    assert len(set(alone[:3])) > 1, "different adapters give different answers"
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(jobs) * 3)

    def worker(i: int, task: str, question: str | None) -> None:
        barrier.wait()
        results[i] = list(pipe.stream(media_files["image"], task, question, **settings))[-1].text

    threads = [threading.Thread(target=worker, args=(k * len(jobs) + i, t, q)) for k in range(3) for i, (t, q) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for index, text in results.items():
        assert text == alone[index % len(jobs)]


def test_loading_happens_once_and_reports_progress(media_files):
    messages: list[str] = []
    pipe = Pipeline(device="cpu", tiny=True, progress=messages.append)
    assert pipe.loaded() == []
    pipe.caption(media_files["image"], "image-caption", preset="fast", max_new_tokens=2, max_length=None)
    loads = [m for m in messages if m.startswith("Loading")]
    assert len(loads) == 3 and any("OPT-2.7B language model" in m for m in loads)
    pipe.caption(media_files["image"], "image-caption", preset="fast", max_new_tokens=2, max_length=None)
    assert len([m for m in messages if m.startswith("Loading")]) == 3
    pipe.preload(["image-vqa", "audio-caption"])  # what app.py --preload runs in the background
    assert pipe.loaded() == [
        "OPT-2.7B language model", "ViT-B/16 image encoder", "COCO captions adapter (image-caption)",
        "VQAv2 adapter (image-vqa)", "AST audio encoder", "AudioCaps captions adapter (audio-caption)",
    ]


def test_user_errors_are_clear(pipe, media_files, tmp_path):
    with pytest.raises(InputError, match="Please type a question"):
        pipe.answer(media_files["image"], "   ", "image-vqa")
    with pytest.raises(InputError, match="characters long; the limit is"):
        pipe.answer(media_files["image"], "why " * 200, "image-vqa")
    with pytest.raises(InputError, match="unknown task 'nope'"):
        pipe.caption(media_files["image"], "nope")
    with pytest.raises(InputError, match="unknown decoding preset"):
        pipe.caption(media_files["image"], "image-caption", preset="turbo")
    with pytest.raises(InputError, match="invalid decoding settings"):
        pipe.caption(media_files["image"], "image-caption", temperature=-1.0)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(MediaError):
        pipe.caption(empty, "image-caption")
    fresh = Pipeline(device="cpu", tiny=True)
    with pytest.raises(MediaError):
        fresh.caption(empty, "image-caption")
    with pytest.raises(InputError):
        fresh.answer(media_files["image"], "", "image-vqa")
    assert fresh.loaded() == [], "bad input fails before any model loads"


def test_out_of_memory_is_named(pipe, media_files, monkeypatch):
    encoder = pipe.encoder(pipe.task("image-caption"))

    def explode(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")

    monkeypatch.setattr(encoder, "forward", explode)
    with pytest.raises(OutOfMemory, match="Out of memory on cpu while running 'image-caption'"):
        pipe.caption(media_files["image"], "image-caption")


def test_missing_weights_name_the_repo_and_the_fix(media_files, fake_hub, monkeypatch):
    """Real loading path, nothing cached and the Hub offline: the error says what to do."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    pipe = Pipeline(device="cpu", source=TinyModels(adapter_files=True))
    with pytest.raises(WeightsUnavailable, match=r"mshukor/eP-ALM.*not in the local Hugging Face cache"):
        pipe.caption(media_files["image"], "image-caption")
    with pytest.raises(WeightsUnavailable, match=r"facebook/opt-2.7b.*hf download facebook/opt-2.7b"):
        Pipeline(device="cpu").caption(media_files["image"], "image-caption")


def test_adapter_from_the_hub_drives_the_answer(media_files, fake_hub):
    """An adapter served by the (fake) Hub in the original .pth format is the one used."""
    tiny = Pipeline(device="cpu", tiny=True)
    state = tiny.adapter(tiny.task("image-caption")).state_dict()
    buffer = __import__("io").BytesIO()
    torch.save({"model": state, "optimizer": {}, "lr_scheduler": {}}, buffer)
    task = tiny.task("image-caption")
    fake_hub.add(task.adapter.repo_id, task.adapter.filename, buffer.getvalue(), repo_type="space")
    real = Pipeline(device="cpu", source=TinyModels(adapter_files=True))
    settings = dict(preset="fast", max_new_tokens=6, max_length=None)
    assert real.caption(media_files["image"], "image-caption", **settings).text == tiny.caption(media_files["image"], "image-caption", **settings).text
    assert len(fake_hub.downloads) == 1


def test_bfloat16_pipeline_runs(media_files):
    pipe = Pipeline(device="cpu", dtype="bfloat16", tiny=True)
    answer = pipe.caption(media_files["audio"], "audio-caption", preset="fast", max_new_tokens=4, max_length=None)
    assert answer.done and answer.dtype == "bfloat16"
    assert pipe.adapter(pipe.task("audio-caption")).connector[0].weight.dtype == torch.float32
    with pytest.raises(InputError, match="float16 is for GPUs"):
        Pipeline(device="cpu", dtype="float16", tiny=True)


def test_a_stream_can_be_resumed_from_other_threads(pipe, media_files):
    """Web servers pull each partial answer in whichever worker thread is free."""
    stream = pipe.stream(media_files["image"], "image-caption", preset="fast", max_new_tokens=8, max_length=None)
    pulled: list = []
    while not pulled or not pulled[-1].done:
        worker = threading.Thread(target=lambda: pulled.append(next(stream)))
        worker.start()
        worker.join()
        assert len(pulled) < 20
    assert not torch.is_inference_mode_enabled(), "the inference mode does not leak into the caller"
    same = pipe.caption(media_files["image"], "image-caption", preset="fast", max_new_tokens=8, max_length=None)
    assert pulled[-1].text == same.text


def test_cpu_weights_are_packed_unless_asked_not_to(media_files):
    from epalm.model import PackedLinear

    settings = dict(preset="fast", max_new_tokens=8, max_length=None)
    packed, dense = Pipeline(device="cpu", tiny=True), Pipeline(device="cpu", tiny=True, pack_weights=False)
    task = packed.task("image-caption")
    assert isinstance(packed.lm(task)[0].decoder.layers[0].fc1, PackedLinear)
    assert not isinstance(dense.lm(task)[0].decoder.layers[0].fc1, PackedLinear)
    assert packed.caption(media_files["image"], "image-caption", **settings).text == dense.caption(media_files["image"], "image-caption", **settings).text
