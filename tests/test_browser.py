"""A real browser (Debian's Chromium, driven by Playwright) uses each tab of the --tiny app.

Screenshots land in test-output/browser/ (or $EPALM_TEST_OUTPUT) for a person to look at.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from epalm import Pipeline
from epalm.tiny import TinyModels

from conftest import ROOT, chromium_executable
from test_adapters import saved_tiny_adapter
from test_app import serve

OUTPUT = Path(os.environ.get("EPALM_TEST_OUTPUT", ROOT / "test-output")) / "browser"
KINDS = {"image": ["caption", "qa"], "video": ["caption", "qa"], "audio": ["caption"]}
DEFAULT_TASK = {
    "image": {"caption": "image-caption", "qa": "image-vqa"},
    "video": {"caption": "video-caption", "qa": "video-qa-msrvtt"},
    "audio": {"caption": "audio-caption"},
}


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium_executable(p),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--use-fake-device-for-media-stream",  # a test camera and microphone, already allowed
                "--use-fake-ui-for-media-stream",
            ],
        )
        yield browser
        browser.close()


def open_app(browser, pipeline: Pipeline):
    blocks, url = serve(pipeline)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    expect(page.get_by_text("Smoke mode")).to_be_visible(timeout=30_000)
    return blocks, page


@pytest.fixture(scope="module")
def app_page(browser):
    blocks, page = open_app(browser, Pipeline(device="cpu", tiny=True))
    yield page
    page.close()
    blocks.close()


@pytest.fixture
def page(app_page):
    """The module's app, reloaded: no earlier test's finished answer is left in a tab to pass for this
    test's (a run's first update can come after the check that would otherwise see the old one)."""
    app_page.reload()
    expect(app_page.get_by_text("Smoke mode")).to_be_visible(timeout=30_000)
    return app_page


@pytest.mark.parametrize("source", ["webcam", "clipboard"])
def test_a_webcam_photo_and_a_pasted_image_are_answered(browser, source):
    """The image input's other sources upload to the app like a file does (its reads are limited to uploads)."""
    blocks, url = serve(Pipeline(device="cpu", tiny=True))
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url.rstrip("/"))
    page = context.new_page()
    try:
        page.goto(url)
        expect(page.get_by_text("Smoke mode")).to_be_visible(timeout=30_000)
        box = page.locator("#image-input")
        if source == "webcam":
            box.get_by_role("button", name="Capture from camera").click()
            box.get_by_text("Click to Access Webcam").click()
            box.locator("video").wait_for(state="visible", timeout=30_000)  # the camera's stream has started
            page.wait_for_function("() => document.querySelector('#image-input video').readyState >= 2")
            box.get_by_role("button", name="capture photo").click()
        else:
            page.evaluate(
                """async () => {
                    const canvas = document.createElement('canvas');
                    canvas.width = 64; canvas.height = 48;
                    const context = canvas.getContext('2d');
                    context.fillStyle = '#c03020'; context.fillRect(0, 0, 64, 48);
                    const blob = await new Promise(done => canvas.toBlob(done, 'image/png'));
                    await navigator.clipboard.write([new ClipboardItem({'image/png': blob})]);
                }"""
            )
            box.get_by_role("button", name="Paste from clipboard").click()
        box.locator("img").first.wait_for(state="visible", timeout=30_000)
        page.locator("#image-caption-run").click()
        assert wait_for_answer(page, "image-caption", "image-caption").strip()
    finally:
        context.close()
        blocks.close()


def example_file(modality: str) -> Path:
    files = sorted(p for p in (ROOT / "examples" / modality).iterdir() if p.suffix not in (".md", ".txt", ".py"))
    assert files, f"no {modality} example"
    return files[0]


def open_mode(page, modality: str, kind: str):
    page.get_by_role("tab", name=modality.capitalize(), exact=True).click()
    if len(KINDS[modality]) > 1:
        page.get_by_role("tab", name={"caption": "Caption", "qa": "Ask a question"}[kind], exact=True).click()
    return page.locator(f"#{modality}-{kind}-tab")


def wait_for_answer(page, prefix: str, task: str) -> str:
    """The final answer: the line naming the task and its timings appears when generation is done."""
    info = page.locator(f"#{prefix}-info")
    expect(info).to_have_text(re.compile(rf"^\s*{re.escape(task)} · "), timeout=120_000)  # exactly this task
    expect(info).to_contain_text("tokens/s")
    answer = page.locator(f"#{prefix}-answer textarea")
    expect(answer).not_to_have_value("", timeout=10_000)
    return answer.input_value()


def upload(page, modality: str, path: Path) -> None:
    page.locator(f"#{modality}-input input[type=file]").first.set_input_files(str(path))
    uploaded = page.locator(f"#{modality}-input").locator("img, video, audio").first
    uploaded.wait_for(state="attached", timeout=30_000)  # the upload has reached the server


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_caption_and_answer_in_each_tab(page, modality):
    open_mode(page, modality, "caption")
    upload(page, modality, example_file(modality))
    page.locator(f"#{modality}-caption-run").click()
    assert wait_for_answer(page, f"{modality}-caption", f"{modality}-caption").strip()
    expect(page.locator(f"#{modality}-caption-answer")).to_contain_text("Caption")
    if "qa" in KINDS[modality]:
        open_mode(page, modality, "qa")
        page.locator(f"#{modality}-qa-question textarea").fill("What is happening here?")
        page.locator(f"#{modality}-qa-question textarea").press("Enter")  # Enter runs the same endpoint as the button
        assert wait_for_answer(page, f"{modality}-qa", DEFAULT_TASK[modality]["qa"]).strip()
    page.locator(f"#{modality}-input").get_by_role("button", name=re.compile("^(Clear|Remove Image)$")).first.click()
    for kind in KINDS[modality]:  # answers about the removed file are gone
        expect(page.locator(f"#{modality}-{kind}-answer textarea")).to_have_value("")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / f"{modality}.png"), full_page=True)
    assert (OUTPUT / f"{modality}.png").stat().st_size > 10_000


@pytest.mark.parametrize("modality, kind", [(m, k) for m, kinds in KINDS.items() for k in kinds])
def test_an_example_runs_the_mode_and_task_on_screen(page, modality, kind):
    tab = open_mode(page, modality, kind)
    prefix = f"{modality}-{kind}"
    choices = page.locator(f"#{prefix}-task")
    task = DEFAULT_TASK[modality][kind]
    if modality == "image":  # pick another model than the default: the example must use the one shown
        choices.locator("input").click()
        page.get_by_role(
            "option", name="GQA · OPT-2.7B + ViT-B/16" if kind == "qa" else "COCO captions · OPT-6.7B + ViT-L/16"
        ).click()
        task = "image-gqa" if kind == "qa" else "image-caption-L"
    examples = tab.locator(f"#{prefix}-examples")
    headers = examples.locator("th").all_inner_texts()
    assert ("Question" in " ".join(headers)) == (kind == "qa"), "a question column only in question mode"
    examples.locator(".gallery-item, tbody tr").first.click()
    assert wait_for_answer(page, prefix, task).strip()
    if kind == "qa":
        expect(page.locator(f"#{prefix}-question textarea")).not_to_have_value("")


def test_a_bad_image_gets_our_message_where_the_answer_goes(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture")
    tab = open_mode(page, "image", "caption")
    # an example first: filling the inputs must not give the session Gradio's own image decoding back
    tab.locator("#image-caption-examples .gallery-item, #image-caption-examples tbody tr").first.click()
    expect(page.locator("#image-caption-info")).to_contain_text("tokens/s", timeout=120_000)
    page.locator("#image-input input[type=file]").first.set_input_files(str(bad))
    expect(page.locator("#image-input img").first).to_have_attribute("src", re.compile("notes.png"), timeout=30_000)
    page.locator("#image-caption-run").click()
    info = page.locator("#image-caption-info")
    expect(info).to_contain_text("Could not read this file as an image", timeout=60_000)
    expect(page.locator("#image-caption-answer textarea")).to_have_value("")
    page.screenshot(path=str(OUTPUT / "bad-image.png"), full_page=True)


def test_stop_ends_a_running_answer(browser, media_files):
    pipeline = Pipeline(device="cpu", tiny=True)
    stream = pipeline.stream

    def slow(*args, **kwargs):  # the real stream, one partial answer every 0.2 s
        for answer in stream(*args, **kwargs):
            time.sleep(0.2)
            yield answer

    pipeline.stream = slow
    blocks, page = open_app(browser, pipeline)
    try:
        upload(page, "image", media_files["image"])
        page.get_by_text("Advanced").click()
        page.get_by_label("Fast: greedy, streamed").check()
        page.locator("#image-caption-run").click()
        answer = page.locator("#image-caption-answer textarea")
        expect(answer).not_to_have_value("", timeout=60_000)
        page.locator("#image-caption-stop").click()
        page.wait_for_timeout(1000)  # a partial answer already on its way has arrived
        stopped = answer.input_value()
        page.wait_for_timeout(1200)  # six more partial answers' time
        assert answer.input_value() == stopped, "no more partial answers after Stop"
        expect(page.locator("#image-caption-info")).not_to_contain_text("tokens/s")
    finally:
        page.close()
        blocks.close()


class SlowLoadingTinyModels(TinyModels):
    """Tiny models whose language model loads only once the test has seen the page say it is loading,
    like a long real download (and never later than a minute)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def lm(self, ref, dtype, progress=None):
        self.release.wait(60)
        return super().lm(ref, dtype, progress)


def test_load_stages_show_where_the_answer_will_appear(browser, media_files):
    source = SlowLoadingTinyModels()
    blocks, page = open_app(browser, Pipeline(device="cpu", source=source))
    try:
        page.get_by_role("tab", name="Audio", exact=True).click()
        upload(page, "audio", media_files["audio"])
        page.locator("#audio-caption-run").click()
        expect(page.locator("#audio-caption-info")).to_contain_text(
            "⏳ Loading OPT-2.7B language model", timeout=30_000
        )
        page.screenshot(path=str(OUTPUT / "loading.png"), full_page=True)
        source.release.set()
        assert wait_for_answer(page, "audio-caption", "audio-caption").strip()
    finally:
        source.release.set()
        page.close()
        blocks.close()


@pytest.mark.parametrize("modality, frames", [("image", 1), ("video", 16), ("audio", 1)])
def test_the_panel_shows_what_the_model_saw(page, modality, frames):
    """After an answer: the encoder's input (one picture, each sampled frame, or the spectrogram), the
    answer's tokens shaded by probability, and the prompt and beams in words. Screenshots for people."""
    tab = open_mode(page, modality, "caption")
    prefix = f"{modality}-caption"
    if modality == "image":  # another test may have picked another model
        page.locator(f"#{prefix}-task").locator("input").click()
        page.get_by_role("option", name="COCO captions · OPT-2.7B + ViT-B/16").click()
    tab.locator(f"#{prefix}-examples .gallery-item, #{prefix}-examples tbody tr").first.click()
    assert wait_for_answer(page, prefix, f"{modality}-caption").strip()
    pictures = page.locator(f"#{prefix}-seen-media img")
    expect(pictures).to_have_count(frames, timeout=30_000)
    expect(pictures.first).to_be_visible()
    caption = {"image": "224×224", "video": "(frame ", "audio": " s of the clip"}[modality]
    expect(page.locator(f"#{prefix}-seen-media")).to_contain_text(caption)
    answer = "".join(page.locator(f"#{prefix}-answer textarea").input_value().split())
    expect(page.locator(f"#{prefix}-tokens")).to_contain_text("shaded by the model's probability")
    assert answer in "".join(page.locator(f"#{prefix}-tokens").inner_text().split()), "the answer, token by token"
    text = page.locator(f"#{prefix}-seen-text")
    expect(text).to_contain_text("Prompt the language model read")
    expect(text).to_contain_text("[P×")
    expect(text.locator("table")).to_contain_text("score")  # the paper's 3 beams, ranked
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.locator(f"#{prefix}-seen").scroll_into_view_if_needed()
    # an earlier test's error message, not this answer's: closed at once (one may be closing itself already, and a
    # click that waits for it would wait for a button that is gone)
    page.locator(".toast-close").evaluate_all("buttons => buttons.forEach(button => button.click())")
    expect(page.locator(".toast-close")).to_have_count(0, timeout=10_000)
    page.screenshot(path=str(OUTPUT / f"{modality}-seen.png"), full_page=True)
    assert (OUTPUT / f"{modality}-seen.png").stat().st_size > 20_000


def test_an_adapter_named_in_the_field_answers_and_is_named(page, tmp_path):
    folder = saved_tiny_adapter(tmp_path / "mine", Pipeline(device="cpu", tiny=True))
    open_mode(page, "image", "caption")
    upload(page, "image", example_file("image"))
    field = page.locator("#image-caption-adapter").get_by_role("textbox")
    field.fill(str(folder))
    try:
        page.locator("#image-caption-run").click()
        assert wait_for_answer(page, "image-caption", f"adapter:{folder}").strip()
        expect(page.locator("#status")).to_contain_text("ViT-B/16 image encoder")
        expect(page.locator("#status")).not_to_contain_text("adapter:")  # not shown to the page's other users
        OUTPUT.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(OUTPUT / "adapter.png"), full_page=True)
    finally:
        field.fill("")  # the page is shared: the next tests use the Model menu again
