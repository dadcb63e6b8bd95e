"""The task registry file and its dataclasses."""

from __future__ import annotations

import pytest

from epalm.refs import DEFAULT_REGISTRY
from epalm.tasks import RegistryError, TextFormat, answer_tokens, get_task, load_registry

TASK_IDS = [
    "image-caption",
    "image-vqa",
    "image-gqa",
    "video-caption",
    "video-qa-msrvtt",
    "video-qa-msvd",
    "audio-caption",
    "image-caption-L",
    "image-vqa-L",
    "image-gqa-L",
]


def test_every_released_adapter_has_a_task_with_the_papers_settings():
    tasks = load_registry()
    assert list(tasks) == TASK_IDS
    for task in tasks.values():
        assert task.generation.num_beams == 3 and task.generation.max_length == 30
        assert (task.injection.start_layer, task.injection.end_layer, task.injection.num_features) == (19, 31, 6)
        assert task.adapter.repo_id == "mshukor/eP-ALM" and task.adapter.repo_type == "space"
        assert task.adapter.filename.endswith("/checkpoint_best.pth")
    base, large = tasks["image-vqa"], tasks["image-vqa-L"]
    assert base.lm.id == "facebook/opt-2.7b" and large.lm.id == "facebook/opt-6.7b"
    assert base.encoder.id == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert large.injection.shared_connector and not large.injection.prompt_mlp
    assert not base.injection.shared_connector and base.injection.prompt_mlp
    assert tasks["video-caption"].preprocess.num_frames == 16 and tasks["video-qa-msvd"].preprocess.num_frames == 8
    assert dict(tasks["audio-caption"].encoder.config) == {"layer_norm_eps": 1e-6}
    assert tasks["audio-caption"].preprocess.sample_rate == 16000


def test_text_formats_follow_the_original():
    tasks = load_registry()
    assert tasks["image-caption"].text.render(None) == ""
    assert tasks["image-vqa"].text.render("What is this?") == "What is this??</a>"  # the original's double '?'
    assert tasks["image-vqa"].text.render("what is this") == "what is this??</a>"
    assert tasks["video-qa-msrvtt"].text.render("what is a man doing") == "what is a man doing?</a>"
    assert TextFormat("{question}?</a>", "</a>", False).render("  hi  ") == "hi?</a>"


def test_a_user_registry_adds_a_task_with_a_local_adapter(tmp_path):
    source = (DEFAULT_REGISTRY).read_text()
    extra = (
        source
        + """
  my-captioner:
    title: Mine
    modality: image
    kind: caption
    lm: {id: me/opt}
    encoder: {library: timm, id: vit_tiny}
    preprocess: {size: 224}
    injection: {start_layer: 2, end_layer: 4, num_features: 2}
    text: {prompt: ""}
    generation: {num_beams: 1, max_new_tokens: 5}
    adapter: {filename: adapters/mine}
"""
    )
    path = tmp_path / "tasks.yaml"
    path.write_text(extra)
    task = get_task("my-captioner", load_registry(path))
    assert task.adapter.repo_id == "" and task.adapter.filename == str(tmp_path / "adapters" / "mine")
    assert task.generation.max_new_tokens == 5


@pytest.mark.parametrize(
    "entry, message",
    [
        ("modality: smell\n    kind: caption", "modality must be one of"),
        ("modality: image\n    kind: caption\n    lm: facebook/opt", "task 'broken': lm must be a mapping"),
    ],
)
def test_malformed_entries_name_the_task(tmp_path, entry, message):
    path = tmp_path / "tasks.yaml"
    path.write_text(f"tasks:\n  broken:\n    {entry}\n")
    with pytest.raises(RegistryError, match=message):
        load_registry(path)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(KeyError, match="image-caption"):
        get_task("nope")


def test_generation_settings_hold_each_tasks_minimum_answer():
    for task in load_registry().values():
        assert task.generation.min_answer_tokens == (8 if task.needs_question else 20)
        if not task.needs_question:  # BOS alone: the paper's limit always leaves 29 new tokens
            assert task.text.prompt == "" and not task.generation.extends_limit(1)


def test_answer_tokens_come_from_the_registry():
    tasks = load_registry()
    lm = tasks["image-vqa"].lm
    assert answer_tokens(tasks.values(), lm) == ["</a>"], "captions on the same LM need the same tokenizer"
    assert answer_tokens([tasks["image-caption"]], lm) == []
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        TextFormat("{question}?", "</a>")


def test_an_adapter_folder_keeps_its_task_s_settings(tmp_path):
    """What an adapter folder stores rebuilds its task: a trained or converted adapter decodes as the task did
    (the minimum answer of long questions included) and is named as the task was."""
    from epalm.tasks import AdapterConfig

    for task in load_registry().values():
        folder = tmp_path / task.id
        folder.mkdir()
        AdapterConfig(task).write(folder)
        rebuilt = AdapterConfig.read(folder, task.id).task
        assert rebuilt.generation == task.generation and rebuilt.label == task.label, task.id
        assert (rebuilt.injection, rebuilt.text, rebuilt.lm, rebuilt.encoder) == (
            task.injection,
            task.text,
            task.lm,
            task.encoder,
        ), task.id
