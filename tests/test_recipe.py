"""The recipe: the rule that picks the paper's recipe or one sized in steps for the data, the registry's
recipes (a user's task may state its own), the two schedules and the parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from epalm.model import Adapter
from epalm.recipe import (
    PAPER_MIN_STEPS,
    TRAVEL,
    ConfigError,
    TrainConfig,
    paper_lr,
    parameter_groups,
    plan,
    set_lr,
    small_factor,
)
from epalm.tasks import TrainingRecipe, load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_small_data_gets_a_schedule_sized_in_steps_and_large_data_the_papers(registry):
    caption = registry["image-caption"]
    small = plan(TrainConfig(), caption, rows=192)
    assert small.recipe == "small" and small.init_from_base and not small.dropout and small.answer_loss_only
    assert small.batch_size == 16 and small.steps_per_epoch == 12 and small.total_steps >= 300
    assert small.validate_every * 10 >= small.epochs and small.patience == 3
    assert "the paper's recipe would give 96 optimizer steps on these 192 rows (8 epochs at batch 16)" in small.reason
    # COCO-sized data: the paper's recipe, exactly as the registry states it
    rows = 566_747
    paper = plan(TrainConfig(), caption, rows=rows)
    assert paper.recipe == "paper" and paper.total_steps == 8 * math.ceil(rows / 16) >= PAPER_MIN_STEPS
    assert (paper.epochs, paper.batch_size, paper.lr, paper.prompt_lr, paper.warmup_lr, paper.min_lr) == (
        8,
        16,
        2e-5,
        1e-5,
        1e-5,
        1e-6,
    )
    assert paper.dropout and not paper.init_from_base and not paper.answer_loss_only and paper.patience == 0
    assert paper.validate_every == 1 and paper.warmup_steps == 4 and not paper.schedule_all_groups
    # the rule counts processes: each takes its share of the rows
    assert plan(TrainConfig(), caption, rows=200_000, processes=1).recipe == "paper"
    assert plan(TrainConfig(), caption, rows=200_000, processes=8).recipe == "small"
    # --recipe paper on small data is the paper's recipe all the same
    forced = plan(TrainConfig(recipe="paper"), caption, rows=192)
    assert forced.recipe == "paper" and forced.total_steps == 8 * 12 and forced.reason == "--recipe paper was asked for"


def test_without_a_released_adapter_small_data_starts_fresh_and_settings_given_win(registry):
    small = plan(TrainConfig(), registry["audio-caption"], rows=200, base_adapter=False)
    assert not small.init_from_base and small.batch_size == 8, "the paper's batch, when smaller"
    given = TrainConfig(epochs=3, batch_size=4, lr=1e-3, dropout=True, init_from_base=False, patience=0)
    mine = plan(given, registry["image-vqa"], rows=200)
    assert (mine.epochs, mine.batch_size, mine.lr, mine.dropout, mine.init_from_base, mine.patience) == (
        3,
        4,
        1e-3,
        True,
        False,
        0,
    )


def test_a_users_registry_task_states_its_own_recipe_or_gets_the_small_one(registry, tmp_path):
    entry = "\n".join(
        [
            "tasks:",
            "  mine:",
            "    modality: image",
            "    kind: caption",
            "    lm: {id: facebook/opt-2.7b}",
            "    encoder: {library: timm, id: vit_base_patch16_224.augreg_in21k_ft_in1k}",
            "    preprocess: {size: 224}",
            "    injection: {start_layer: 19, end_layer: 31, num_features: 6}",
            "    text: {prompt: ''}",
            "    generation: {num_beams: 3, max_length: 30}",
            "    adapter: {filename: nowhere.pth}",
            "TRAINING",
        ]
    )
    recipe = "    training: {epochs: 2, batch_size: 4, lr: 3e-4, prompt_lr: 1e-3, warmup_lr: 1e-4, min_lr: 0}"
    (tmp_path / "own.yaml").write_text(entry.replace("TRAINING", recipe))
    mine = load_registry(tmp_path / "own.yaml")["mine"]
    assert mine.training == TrainingRecipe(2, 4, 3e-4, 1e-3, 1e-4, 0.0)  # `3e-4` without a dot is a YAML string
    assert plan(TrainConfig(), mine, rows=50_000).recipe == "paper"
    assert plan(TrainConfig(recipe="paper"), mine, rows=10).lr == 3e-4
    (tmp_path / "none.yaml").write_text(entry.replace("TRAINING", ""))
    none = load_registry(tmp_path / "none.yaml")["mine"]
    assert none.training is None and plan(TrainConfig(), none, rows=10**6).recipe == "small"
    with pytest.raises(ConfigError, match="the task 'mine' states no paper recipe"):
        plan(TrainConfig(recipe="paper"), none, rows=10)


def test_the_papers_schedule_moves_group_0_only_unless_told(registry):
    qa = registry["image-vqa"]
    recipe = plan(TrainConfig(recipe="paper", min_lr=1e-6), qa, rows=64 * 5)
    assert [paper_lr(recipe, 0, i) for i in (0, 99, 100, 250, 399, 400, 5000)] == pytest.approx(
        [1e-5, 1e-5, 1.25e-5, 1.5e-5, 1.75e-5, 2e-5, 2e-5]
    )
    assert paper_lr(recipe, 4, 0) == pytest.approx(1e-6 + 0.5 * (2e-5 - 1e-6) * (1 + math.cos(math.pi * 4 / 8)))
    adapter = Adapter(qa.injection, 32, 32, 32)
    groups = parameter_groups(adapter, qa, recipe, weight_decay=0.02)
    names = {id(p): n for n, p in adapter.named_parameters()}
    assert all("connector" in names[id(p)] for p in groups[0]["params"]) and groups[1]["lr"] == 1e-5
    set_lr(groups, recipe, 3, 0)
    assert groups[0]["lr"] == paper_lr(recipe, 3, 0) and groups[1]["lr"] == 1e-5
    caption = registry["image-caption"]
    both = plan(TrainConfig(recipe="paper", schedule_all_groups=True), caption, rows=100)
    groups = parameter_groups(adapter, caption, both, weight_decay=0.02)
    assert groups[0]["weight_decay"] == 0 and all(p.ndim == 1 for p in groups[0]["params"])
    set_lr(groups, both, 0, 0)
    assert groups[0]["lr"] == groups[1]["lr"] == 1e-5


def test_the_small_schedule_warms_up_then_decays_and_each_tensor_moves_at_its_own_scale(registry):
    task = registry["image-caption"]
    recipe = plan(TrainConfig(), task, rows=160)  # 10 steps an epoch, 20 passes: 200 steps, so the least, 300
    assert recipe.total_steps == 300 and recipe.warmup_steps == 15
    factors = [small_factor(recipe, step) for step in range(recipe.total_steps)]
    assert factors[0] == pytest.approx(1 / 15) and factors[14] == 1.0 and factors[-1] < 0.001
    assert all(a <= b for a, b in zip(factors[:15], factors[1:15]))
    assert all(a >= b for a, b in zip(factors[14:], factors[15:]))
    torch.manual_seed(0)
    adapter = Adapter(task.injection, 768, 64, 64)
    groups = {g["name"]: g for g in parameter_groups(adapter, task, recipe, weight_decay=0.02)}
    weight = adapter.connector[0].weight
    assert groups["connector.0.weight"]["lr"] == pytest.approx(TRAVEL * weight.pow(2).mean().sqrt().item() / 300)
    assert groups["connector.0.bias"]["lr"] == groups["connector.0.weight"]["lr"]
    assert groups["connector.0.bias"]["weight_decay"] == 0 and groups["connector.0.weight"]["weight_decay"] == 0.02
    embedding = groups["prompt_module.prefix_embedding.0.weight"]["lr"]
    assert embedding > 20 * groups["connector.0.weight"]["lr"], "N(0, 1) prompt vectors move faster than 1/sqrt(768)"
    set_lr(list(groups.values()), recipe, 1, 5)  # epoch 1, iteration 5: step 15, past the warm-up
    assert groups["connector.0.weight"]["lr"] == pytest.approx(
        groups["connector.0.weight"]["peak_lr"] * small_factor(recipe, 15)
    )
    fixed = plan(TrainConfig(lr=1e-3, prompt_lr=1e-2), task, rows=160)
    lrs = {g["name"]: g["lr"] for g in parameter_groups(adapter, task, fixed, weight_decay=0.02)}
    assert lrs["connector.0.weight"] == 1e-3 and lrs["prompt_module.prefix_embedding.0.weight"] == 1e-2


def test_settings_that_cannot_work_are_refused_at_once():
    with pytest.raises(ConfigError, match=r"^batch_size \(--batch-size\) must be at least 1, got 0$"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="recipe must be one of auto, paper, small, got 'fast'"):
        TrainConfig(recipe="fast")
    with pytest.raises(ConfigError, match="resume and overwrite exclude each other"):
        TrainConfig(resume=True, overwrite=True)
    with pytest.raises(ConfigError, match=r"patience \(--patience\) must be 0 \(never stop early\) or more"):
        TrainConfig(patience=-1)
