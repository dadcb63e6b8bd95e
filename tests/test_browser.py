"""A real browser (Debian's Chromium, driven by Playwright) uses each tab of the --tiny app.

Screenshots land in test-output/browser/ (or $EPALM_TEST_OUTPUT) for a person to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from epalm import Pipeline

from conftest import ROOT, chromium_executable
from test_app import serve

OUTPUT = Path(os.environ.get("EPALM_TEST_OUTPUT", ROOT / "test-output")) / "browser"


@pytest.fixture(scope="module")
def page():
    blocks, url = serve(Pipeline(device="cpu", tiny=True))
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium_executable(p),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        expect(page.get_by_text("Smoke mode")).to_be_visible(timeout=30_000)
        yield page
        browser.close()
    blocks.close()


def example_file(modality: str) -> Path:
    files = sorted(p for p in (ROOT / "examples" / modality).iterdir() if p.suffix not in (".md", ".txt"))
    assert files, f"no {modality} example"
    return files[0]


def panel(page, modality: str):
    page.get_by_role("tab", name=modality.capitalize()).click()
    return page.locator(f"#{modality}-tab")


def wait_for_answer(page, modality: str, task: str) -> str:
    """The final answer: the line naming the task and its timings appears when generation is done."""
    expect(page.locator(f"#{modality}-info")).to_contain_text(task, timeout=120_000)
    expect(page.locator(f"#{modality}-info")).to_contain_text("tokens/s")
    answer = page.locator(f"#{modality}-answer textarea")
    expect(answer).not_to_have_value("", timeout=10_000)
    return answer.input_value()


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_caption_and_answer_in_each_tab(page, modality):
    tab = panel(page, modality)
    tab.locator("input[type=file]").first.set_input_files(str(example_file(modality)))
    uploaded = page.locator(f"#{modality}-input").locator("img, video, audio").first
    uploaded.wait_for(state="attached", timeout=30_000)  # the upload has reached the server
    tab.get_by_role("button", name="Caption", exact=True).click()
    caption = wait_for_answer(page, modality, f"{modality}-caption")
    assert caption.strip()
    if modality != "audio":
        tab.get_by_label("Ask a question").check()
        page.locator(f"#{modality}-question textarea").fill("What is happening here?")
        tab.get_by_role("button", name="Answer", exact=True).click()
        assert wait_for_answer(page, modality, {"image": "image-vqa", "video": "video-qa-msrvtt"}[modality]).strip()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / f"{modality}.png"), full_page=True)
    assert (OUTPUT / f"{modality}.png").stat().st_size > 10_000
