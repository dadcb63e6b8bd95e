"""The shared pipeline: one LM and encoder per id, per-call adapters, streaming, errors."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch

from epalm.answers import Status, answers
from epalm.checks import MAX_QUESTION_CHARS, MAX_QUESTION_TOKENS
from epalm.config import MAX_BATCH_ROWS
from epalm.decoding import DecodingOptions
from epalm.errors import InputError, WeightsUnavailable
from epalm.media import MediaError
from epalm.pipeline import OutOfMemory, Pipeline
from epalm.presets import PRESETS
from epalm.tasks import TextFormat, load_registry
from epalm.tiny import TinyModels

from conftest import write_image


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(device="cpu", tiny=True)


@pytest.mark.parametrize(
    "task, modality, question",
    [
        ("image-caption", "image", None),
        ("image-vqa", "image", "what is this"),
        ("video-caption", "video", None),
        ("video-qa-msvd", "video", "what happens"),
        ("audio-caption", "audio", None),
    ],
)
def test_every_modality_answers(pipe, media_files, task, modality, question):
    events = list(pipe.stream(media_files[modality], task, question, preset="fast", max_new_tokens=6))
    final = events[-1]
    assert final.done and final.task == task and isinstance(final.text, str)
    assert final.timings.new_tokens >= 1 and final.timings.media_s > 0 and final.timings.first_token_s > 0
    assert all(not a.done for a in answers(events[:-1]))
    assert [e.stage for e in events if isinstance(e, Status)][-1] == "encoding", "the stage that runs is said"


def test_paper_preset_is_the_default_and_is_beam_search(pipe, media_files):
    events = list(pipe.stream(media_files["image"], "image-caption"))
    final = list(answers(events))
    assert len(final) == 1 and final[0].done, "beam search gives only the final answer"
    searched = [e for e in events if isinstance(e, Status) and e.stage == "decoding"]
    assert searched and "3-beam search" in searched[0].message, "and shows its progress meanwhile"
    assert pipe.decoding_options(pipe.task("image-caption")).num_beams == 3


def test_streaming_gives_growing_prefixes_ending_in_the_final_text(pipe, media_files):
    parts = [
        a.text for a in answers(pipe.stream(media_files["image"], "image-caption", preset="fast", max_new_tokens=12))
    ]
    assert len(parts) >= 3
    assert all(b.startswith(a) for a, b in zip(parts[:-2], parts[1:-1]))
    assert parts[-1] == parts[-2] or parts[-1].startswith(parts[-2])
    whole = pipe.caption(media_files["image"], "image-caption", preset="fast", max_new_tokens=12)
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
    settings = dict(preset="fast", max_new_tokens=8)
    alone = [
        pipe.answer(media_files["image"], q, t, **settings).text
        if q
        else pipe.caption(media_files["image"], t, **settings).text
        for t, q in jobs
    ]
    assert len(set(alone[:3])) > 1, "different adapters give different answers"
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(jobs) * 3)

    def worker(i: int, task: str, question: str | None) -> None:
        barrier.wait()
        results[i] = list(answers(pipe.stream(media_files["image"], task, question, **settings)))[-1].text

    threads = [
        threading.Thread(target=worker, args=(k * len(jobs) + i, t, q))
        for k in range(3)
        for i, (t, q) in enumerate(jobs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(threads), "every worker answered"
    for index, text in results.items():
        assert text == alone[index % len(jobs)]


def test_loading_happens_once_and_reports_progress(media_files):
    messages: list[str] = []
    pipe = Pipeline(device="cpu", tiny=True, progress=messages.append)
    assert pipe.loaded() == []
    pipe.caption(media_files["image"], "image-caption", preset="fast", max_new_tokens=2)
    loads = [m for m in messages if m.startswith("Loading")]
    assert len(loads) == 3 and any("OPT-2.7B language model" in m for m in loads)
    pipe.caption(media_files["image"], "image-caption", preset="fast", max_new_tokens=2)
    assert len([m for m in messages if m.startswith("Loading")]) == 3
    pipe.preload(["image-vqa", "audio-caption"])  # what app.py --preload runs in the background
    assert pipe.loaded() == [
        "OPT-2.7B language model",
        "ViT-B/16 image encoder",
        "COCO captions adapter (image-caption)",
        "VQAv2 adapter (image-vqa)",
        "AST audio encoder",
        "AudioCaps captions adapter (audio-caption)",
    ]


def test_user_errors_are_clear(pipe, media_files, tmp_path):
    with pytest.raises(InputError, match="Please type a question"):
        pipe.answer(media_files["image"], "   ", "image-vqa")
    with pytest.raises(InputError, match="characters long; the limit is"):
        pipe.answer(media_files["image"], "why " * 200, "image-vqa")
    with pytest.raises(InputError, match="unknown task 'nope'"):
        pipe.caption(media_files["image"], "nope")
    with pytest.raises(InputError, match=r"'Image captioning \(COCO\)' writes a caption and takes no question"):
        pipe.answer(media_files["image"], "what is it?", "image-caption")
    with pytest.raises(MediaError, match="This file is a still image .mjpeg., not a video: use an image task"):
        pipe.caption(media_files["image"], "video-caption")
    with pytest.raises(InputError, match="unknown decoding preset"):
        pipe.caption(media_files["image"], "image-caption", preset="turbo")
    with pytest.raises(InputError, match="invalid decoding settings: sampling needs temperature > 0"):
        pipe.caption(media_files["image"], "image-caption", preset="sampling", temperature=-1.0)
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
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 123 bytes"
        )

    monkeypatch.setattr(encoder, "forward", explode)
    monkeypatch.setattr(pipe.features, "size", 0)  # the encoder must run: the image's features may be kept
    with pytest.raises(OutOfMemory, match="Out of memory on cpu while running 'image-caption'"):
        pipe.caption(media_files["image"], "image-caption")


def test_missing_weights_name_the_repo_and_the_fix(media_files, fake_hub, monkeypatch):
    """Real loading path, nothing cached and the Hub offline: the error says what to do."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    pipe = Pipeline(device="cpu", source=TinyModels(adapter_files=True))
    fix = "With network access, `python -m epalm download image-caption` fetches the files 'image-caption' needs"
    adapter = "checkpoints/float32/ePALM_caption/checkpoint_best.pth in the Space mshukor/eP-ALM"
    for pipeline in (pipe, Pipeline(device="cpu")):  # the real source checks the adapter first too
        with pytest.raises(WeightsUnavailable) as error:
            pipeline.caption(media_files["image"], "image-caption")
        message = f"Cannot get the adapter of image-caption: {adapter} is not downloaded, and cannot be downloaded now."
        assert str(error.value) == message and error.value.not_cached
        assert "downloads are off (HF_HUB_OFFLINE=1)" in error.value.detail and fix in error.value.detail


def test_adapter_from_the_hub_drives_the_answer(media_files, fake_hub):
    """An adapter served by the (fake) Hub in the original .pth format is the one used."""
    tiny = Pipeline(device="cpu", tiny=True)
    state = tiny.adapter(tiny.task("image-caption")).state_dict()
    buffer = __import__("io").BytesIO()
    torch.save({"model": state, "optimizer": {}, "lr_scheduler": {}}, buffer)
    task = tiny.task("image-caption")
    fake_hub.add(task.adapter.repo_id, task.adapter.filename, buffer.getvalue(), repo_type="space")
    real = Pipeline(device="cpu", source=TinyModels(adapter_files=True))
    settings = dict(preset="fast", max_new_tokens=6)
    assert (
        real.caption(media_files["image"], "image-caption", **settings).text
        == tiny.caption(media_files["image"], "image-caption", **settings).text
    )
    assert len(fake_hub.downloads) == 1


def test_bfloat16_pipeline_runs(media_files):
    pipe = Pipeline(device="cpu", dtype="bfloat16", tiny=True)
    answer = pipe.caption(media_files["audio"], "audio-caption", preset="fast", max_new_tokens=4)
    assert answer.done and answer.dtype == "bfloat16"
    assert pipe.adapter(pipe.task("audio-caption")).connector[0].weight.dtype == torch.float32
    with pytest.raises(InputError, match="float16 is for GPUs"):
        Pipeline(device="cpu", dtype="float16", tiny=True)


def test_a_stream_can_be_resumed_from_other_threads(pipe, media_files):
    """Web servers pull each partial answer in whichever worker thread is free."""
    stream = pipe.stream(media_files["image"], "image-caption", preset="fast", max_new_tokens=8)
    pulled: list = []
    while not pulled or not getattr(pulled[-1], "done", False):
        worker = threading.Thread(target=lambda: pulled.append(next(stream)))
        worker.start()
        worker.join()
        assert len(pulled) < 20
    assert not torch.is_inference_mode_enabled(), "the inference mode does not leak into the caller"
    same = pipe.caption(media_files["image"], "image-caption", preset="fast", max_new_tokens=8)
    assert pulled[-1].text == same.text


def test_cpu_weights_are_packed_unless_asked_not_to(media_files):
    from epalm.model import PackedLinear

    settings = dict(preset="fast", max_new_tokens=8)
    packed, dense = Pipeline(device="cpu", tiny=True), Pipeline(device="cpu", tiny=True, pack_weights=False)
    task = packed.task("image-caption")
    assert isinstance(packed.lm(task)[0].decoder.layers[0].fc1, PackedLinear)
    assert not isinstance(dense.lm(task)[0].decoder.layers[0].fc1, PackedLinear)
    assert (
        packed.caption(media_files["image"], "image-caption", **settings).text
        == dense.caption(media_files["image"], "image-caption", **settings).text
    )


def test_presets_keep_the_tasks_own_limits(media_files):
    """A task whose registry sets a 5-token answer keeps it under every preset."""
    tasks = load_registry()
    short = DecodingOptions(num_beams=3, max_new_tokens=5)
    registry = {**tasks, "image-caption": replace(tasks["image-caption"], generation=short)}
    pipe = Pipeline(device="cpu", tiny=True, registry=registry)
    task = pipe.task("image-caption")
    for preset in PRESETS:
        assert pipe.decoding_options(task, preset).max_new_tokens == 5
        answer = pipe.caption(media_files["image"], "image-caption", preset=preset)
        assert 1 <= answer.timings.new_tokens <= 5 + (preset == "paper")  # beam search counts its closing EOS
    assert pipe.decoding_options(task, "fast", max_new_tokens=7).max_new_tokens == 7


def test_each_partial_answer_has_its_own_timings(pipe, media_files):
    partials = list(answers(pipe.stream(media_files["image"], "image-caption", preset="fast", max_new_tokens=12)))
    assert len({id(a.timings) for a in partials}) == len(partials)
    counts = [a.timings.new_tokens for a in partials]
    assert counts == sorted(counts) and counts[0] < counts[-1], "an early partial keeps the count it was shown with"
    assert all(a.timings.first_token_s == partials[0].timings.first_token_s for a in partials)
    assert "first token" in partials[-1].timings.summary()


def test_beam_search_timings_claim_no_first_token(pipe, media_files):
    answer = pipe.caption(media_files["image"], "image-caption")
    assert answer.timings.first_token_s is None and answer.timings.num_beams == 3
    summary = answer.timings.summary()
    assert "first token" not in summary and "3-beam search" in summary and "tokens/s" in summary


def test_answer_tokens_are_the_registrys(media_files):
    """The tokenizer gains each task's answer token, read from the registry: one id, at the prompt's end."""
    tasks = load_registry()
    vqa = tasks["image-vqa"]
    custom = replace(vqa, text=TextFormat("{question}<ans>", "<ans>"))
    pipe = Pipeline(device="cpu", tiny=True, registry={"image-vqa": vqa, "custom": replace(custom, id="custom")})
    pipe.preload(["custom"])  # the adapter loads the LM first: its tokenizer gets the tokens there too
    tokenizer = pipe.lm(pipe.task("custom"))[1]
    for token in ("</a>", "<ans>"):
        assert tokenizer.convert_tokens_to_ids(token) not in (None, tokenizer.unk_token_id)
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert tokenizer(f"what{token}", add_special_tokens=False).input_ids[-1] == token_id
    assert pipe.answer(media_files["image"], "what is it", "custom", preset="fast", max_new_tokens=3).done


def _question(tokenizer, task, prompt_ids: int) -> str:
    """A question whose prompt (BOS, question, the task's template) is exactly `prompt_ids` ids."""
    for word in (" a", " the", " cat"):
        question = "what"
        while (length := len(tokenizer(task.text.render(question)).input_ids)) < prompt_ids:  # BOS included
            question += word
        if length == prompt_ids:
            return question
    raise AssertionError(f"no question of {prompt_ids} prompt ids")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("prompt_ids", [28, 29, 30, 31, 60])
def test_long_questions_get_the_tasks_minimum_answer(pipe, media_files, preset, prompt_ids):
    """max_length 30 counts the question: the original crashed with beams at 30+ ids and cut answers
    to a token or two; here the answer gets the task's min_answer_tokens, and the answer says so."""
    task = pipe.task("image-vqa")
    tokenizer = pipe.lm(task)[1]
    answer = pipe.answer(media_files["image"], _question(tokenizer, task, prompt_ids), "image-vqa", preset=preset)
    room = task.generation.min_answer_tokens
    assert answer.done and 1 <= answer.timings.new_tokens <= room + (preset == "paper")
    assert f"its {prompt_ids} tokens leave {max(0, 30 - prompt_ids)} of the task's 30" in answer.notice
    assert f"up to {room} new tokens; raise max new tokens" in answer.notice
    short = pipe.answer(media_files["image"], "what is it", "image-vqa", preset=preset)
    assert short.notice is None
    question = _question(tokenizer, task, prompt_ids)
    chosen = pipe.answer(media_files["image"], question, "image-vqa", preset=preset, max_new_tokens=3)
    assert chosen.notice is None and chosen.timings.new_tokens <= 3 + (preset == "paper")


def test_question_limits_are_one_pair_of_numbers(pipe, media_files):
    """A question as long as the character limit allows, in ordinary words, fits the token limit."""
    question = ("what is the man holding in the picture " * 20)[:MAX_QUESTION_CHARS]
    assert pipe.answer(media_files["image"], question, "image-vqa", preset="fast").done
    with pytest.raises(InputError, match=f"characters long; the limit is {MAX_QUESTION_CHARS}"):
        pipe.answer(media_files["image"], question + "?" * 1, "image-vqa")
    with pytest.raises(InputError, match=f"tokens long; the limit is {MAX_QUESTION_TOKENS}"):
        pipe.answer(media_files["image"], "\u2603" * MAX_QUESTION_CHARS, "image-vqa")
    with pytest.raises(InputError, match="exceed the model's 256 positions"):
        pipe.answer(media_files["image"], "what", "image-vqa", max_new_tokens=300)


def test_concurrent_calls_share_decode_steps_and_get_their_answers_alone(media_files):
    """Calls from several threads (the app's) meet in one batch, each answer the one it gets alone."""
    jobs = [
        ("image-caption", None, "fast"),
        ("image-vqa", "what is it", "paper"),
        ("audio-caption", None, "sampling"),
        ("video-qa-msvd", "what happens", "fast"),
        ("image-caption", None, "paper"),
    ]
    settings = dict(max_new_tokens=6, seed=3)
    solo = Pipeline(device="cpu", tiny=True, batching=False)
    alone = [solo.stream(media_files[solo.task(t).modality], t, q, preset=p, **settings) for t, q, p in jobs]
    alone = [list(answers)[-1].text for answers in alone]
    pipe = Pipeline(device="cpu", tiny=True)
    assert pipe.batching and pipe.max_batch_rows == MAX_BATCH_ROWS
    pipe.preload([task for task, _, _ in jobs])  # tiny models draw their weights from the global RNG: not in parallel
    steps: list[int] = []
    pipe.scheduler(pipe.lm(pipe.task("image-caption"))[0]).callback = steps.append
    barrier, results = threading.Barrier(len(jobs)), {}

    def worker(i: int, task: str, question: str | None, preset: str) -> None:
        barrier.wait()
        results[i] = list(
            pipe.stream(media_files[pipe.task(task).modality], task, question, preset=preset, **settings)
        )[-1]

    threads = [threading.Thread(target=worker, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i].text for i in range(len(jobs))] == alone
    assert max(steps) > 3, "several calls ran in one step"
    assert all(answer.timings.encode_s > 0 and answer.timings.generate_s > 0 for answer in results.values())


def test_batching_settings_come_from_the_environment(monkeypatch, media_files):
    monkeypatch.setenv("EPALM_MAX_BATCH_ROWS", "5")
    monkeypatch.setenv("EPALM_BATCHING", "0")
    pipe = Pipeline(device="cpu", tiny=True)
    assert (pipe.batching, pipe.max_batch_rows) == (False, 5)
    assert pipe.caption(media_files["image"], preset="fast", max_new_tokens=3).done
    assert not pipe._schedulers, "unbatched calls decode in the caller's thread"
    assert Pipeline(device="cpu", tiny=True, batching=True, max_batch_rows=2).max_batch_rows == 2
    monkeypatch.setenv("EPALM_MAX_BATCH_ROWS", "many")
    with pytest.raises(InputError, match="EPALM_MAX_BATCH_ROWS must be a whole number"):
        Pipeline(device="cpu", tiny=True)


def test_a_closed_stream_leaves_the_batch_at_the_next_step(media_files):
    """Stop or a closed tab closes the generator: its rows and cache go, the rest decodes on."""
    pipe = Pipeline(device="cpu", tiny=True)
    scheduler = pipe.scheduler(pipe.lm(pipe.task("image-caption"))[0])
    closed, steps = threading.Event(), []

    def callback(rows: int) -> None:
        steps.append(rows)
        if not closed.is_set():
            time.sleep(0.005)  # slow steps: the first stream cannot finish before it is closed

    scheduler.callback = callback
    settings = dict(preset="fast", max_new_tokens=150)
    closing = pipe.stream(media_files["image"], "image-caption", **settings)
    staying = answers(pipe.stream(media_files["audio"], "audio-caption", **settings))
    next(staying)  # its first token
    while 2 not in steps:  # until both share steps
        next(closing)
    closing.close()
    closed.set()
    at_close = len(steps)
    final = list(staying)[-1]
    assert final.done and final.timings.new_tokens == 150
    assert set(steps[at_close + 1 :]) == {1}, "one row left at the next step"
    assert scheduler.rows == 0


@pytest.mark.parametrize("batching", [False, True])
def test_media_asked_about_again_reuses_its_encoder_features(media_files, encoder_calls, tmp_path, batching):
    """Another question, preset or task about the same picture skips the encoder and answers the same."""
    pipe = Pipeline(device="cpu", tiny=True, batching=batching)
    assert pipe.features.size == 64
    calls = encoder_calls(pipe.encoder(pipe.task("image-caption")))
    first = pipe.caption(media_files["image"], preset="fast", max_new_tokens=6)
    again = pipe.caption(media_files["image"], preset="fast", max_new_tokens=6)
    assert calls == [1] and again.text == first.text
    assert not first.timings.features_cached and again.timings.features_cached
    assert "features reused" in again.timings.summary() and "features reused" not in first.timings.summary()
    beams = pipe.caption(media_files["image"], preset="paper")
    assert calls == [1] and beams.timings.features_cached and "features reused" in beams.timings.summary()
    asked = pipe.answer(media_files["image"], "what is it", task="image-vqa", preset="fast", max_new_tokens=6)
    assert calls == [1] and asked.timings.features_cached, "the tasks share the encoder and its blocks"
    other = pipe.caption(write_image(tmp_path / "other.jpg", seed=1), preset="fast", max_new_tokens=6)
    assert calls == [1, 1] and not other.timings.features_cached


def test_cached_features_give_the_ids_of_a_fresh_encode(media_files):
    fresh = Pipeline(device="cpu", tiny=True, feature_cache=0)
    pipe = Pipeline(device="cpu", tiny=True)
    settings = dict(task="video-caption", preset="fast", max_new_tokens=8, inspect=True)
    want = fresh.caption(media_files["video"], **settings)
    pipe.caption(media_files["video"], **settings)
    got = pipe.caption(media_files["video"], **settings)
    assert got.timings.features_cached and not want.timings.features_cached
    assert [t.id for t in got.inspection.tokens] == [t.id for t in want.inspection.tokens]
    assert [t.prob for t in got.inspection.tokens] == pytest.approx([t.prob for t in want.inspection.tokens])
    assert len(got.inspection.seen.images) == 16, "inspection still shows the frames the encoder saw"


def test_a_video_sampled_to_other_frames_is_encoded_again(media_files, encoder_calls):
    pipe = Pipeline(device="cpu", tiny=True, batching=False)
    calls = encoder_calls(pipe.encoder(pipe.task("video-caption")))
    for frames, cached in [(8, False), (4, False), (8, True)]:
        answer = pipe.caption(media_files["video"], "video-caption", num_frames=frames, preset="fast", max_new_tokens=3)
        assert answer.timings.features_cached == cached
    assert calls == [1, 1]


def test_feature_cache_setting_comes_from_the_environment(monkeypatch, media_files, encoder_calls):
    monkeypatch.setenv("EPALM_FEATURE_CACHE", "0")
    pipe = Pipeline(device="cpu", tiny=True)
    calls = encoder_calls(pipe.encoder(pipe.task("image-caption")))
    answers = [pipe.caption(media_files["image"], preset="fast", max_new_tokens=3) for _ in range(2)]
    assert calls == [1, 1] and not any(answer.timings.features_cached for answer in answers)
    assert Pipeline(device="cpu", tiny=True, feature_cache=5).features.size == 5
    monkeypatch.setenv("EPALM_FEATURE_CACHE", "lots")
    with pytest.raises(InputError, match="EPALM_FEATURE_CACHE must be a whole number, not 'lots'"):
        Pipeline(device="cpu", tiny=True)
    monkeypatch.setenv("EPALM_FEATURE_CACHE", "-1")
    with pytest.raises(InputError, match="EPALM_FEATURE_CACHE must be a whole number from 0 to 1e\\+06, not -1"):
        Pipeline(device="cpu", tiny=True)


def test_a_running_stream_keeps_getting_tokens_while_a_newcomer_is_encoded(media_files, monkeypatch):
    """Encoders run on the requests' own threads: a 1 s video encoding beside a running answer leaves the
    shared decode steps going (it used to run on the scheduler's thread, between two steps)."""
    pipe = Pipeline(device="cpu", tiny=True)
    pipe.preload(["image-caption", "video-caption"])
    encoder, forward = pipe.encoder(pipe.task("video-caption")), None
    window: list[float] = []

    def slow(video, num_blocks):  # the newcomer's encoder, slowed down to a real video's seconds
        window.append(time.perf_counter())
        time.sleep(1.0)
        out = forward(video, num_blocks)
        window.append(time.perf_counter())
        return out

    forward = encoder.forward
    monkeypatch.setattr(encoder, "forward", slow)
    scheduler = pipe.scheduler(pipe.lm(pipe.task("image-caption"))[0])
    scheduler.callback = lambda rows: time.sleep(0.008)  # steps of ~10 ms: the answer outlasts the encoding
    arrivals: list[float] = []
    running = answers(pipe.stream(media_files["image"], "image-caption", preset="fast", max_new_tokens=250))
    next(running)
    newcomer = threading.Thread(target=pipe.caption, args=(media_files["video"], "video-caption"))
    newcomer.start()
    for _ in running:
        arrivals.append(time.perf_counter())
    newcomer.join(30)
    start, end = window
    during = [t for t in arrivals if start < t < end]
    assert len(during) >= 20, f"{len(during)} tokens arrived while the video was encoded for {end - start:.1f} s"


@pytest.mark.parametrize("batching", [False, True])
def test_a_closed_beam_search_stops_at_its_next_step_batched_or_not(media_files, batching, monkeypatch):
    """Stop closes the stream: the search leaves at its next step, alone or in the shared batch."""
    pipe = Pipeline(device="cpu", tiny=True, batching=batching)
    lm = pipe.lm(pipe.task("image-caption"))[0]
    steps, step = [], lm.step
    monkeypatch.setattr(lm, "step", lambda state, tokens: steps.append(len(tokens)) or step(state, tokens))
    stream = pipe.stream(media_files["image"], "image-caption", num_beams=8, max_new_tokens=250)
    for event in stream:
        if isinstance(event, Status) and event.stage == "decoding" and len(steps) >= 3:
            break
    stream.close()
    at_close = len(steps)
    time.sleep(0.3)
    assert len(steps) <= at_close + 1, "at most the step under way when it was closed"
    if batching:
        assert pipe.scheduler(lm).rows == 0
