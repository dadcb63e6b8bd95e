"""What a training run says about itself: its ending (did it beat the adapter it started from?) and the
model card (README.md) of the adapter folder it writes. Nothing here depends on the time a run took,
so an interrupted and resumed run writes the card an uninterrupted one writes."""

from __future__ import annotations

from pathlib import Path

from .adapter_format import model_card_head
from .recipe import PAPER_MIN_STEPS, TRAVEL
from .tasks import Task

_NOT_METRICS = ("event", "epoch", "train_loss", "samples_per_s")


def summary(metric: str, best: dict, baseline: dict, improved: bool, from_base: bool) -> str:
    """The run's ending in one sentence: its best epoch against the adapter it started from, on the same
    validation rows; plainly, when training did not beat it."""
    start = "the base task's adapter" if from_base else "a fresh adapter"
    if improved:
        return (
            f"Best {metric} {best[metric]:.4f} at epoch {best['epoch']}, up from {baseline[metric]:.4f} "
            f"before training ({start}, on the same validation rows)."
        )
    return (
        f"Training did not beat the adapter it started from: best {metric} {best[metric]:.4f} (epoch "
        f"{best['epoch']}) against {baseline[metric]:.4f} before training ({start}, on the same validation "
        f"rows). The adapter written is no better than that one; more data, more epochs (--epochs) or another "
        "learning rate (--lr) may help."
    )


def _recipe(plan: dict, settings: dict, peak_lrs: dict, qa: bool) -> str:
    """The recipe as a list: what ran, why, and where it departs from the original."""
    if plan["recipe"] == "paper":
        what = 'The released adapters\' recipe (eP-ALM, ICCV 2023; docs/original.md, "Training")'
        rates = (
            f"AdamW, lr {plan['lr']:g} (prompt lr {plan['prompt_lr']:g} for QA, as the original); warm-up from "
            f"{plan['warmup_lr']:g} in {plan['warmup_steps']} steps of {plan['warmup_every']} iterations, then cosine "
            f"to {plan['min_lr']:g} per epoch"
        )
    else:
        what = "Sized in optimizer steps for small data (docs/training.md)"
        low, high = min(peak_lrs.values()), max(peak_lrs.values())
        rates = (
            f"AdamW, peak lr {low:.3g} to {high:.3g} (each weight tensor's RMS x {TRAVEL:g} / {plan['total_steps']} "
            f"steps, unless set); linear warm-up over {plan['warmup_steps']} steps, then cosine to 0"
        )
    every = "every epoch" if plan["validate_every"] == 1 else f"every {plan['validate_every']} epochs"
    stopping = f"stop after {plan['patience']} without improvement" if plan["patience"] else "no early stop"
    features = "cached" if settings["cache_features"] else "computed each step"
    lines = [
        f"{what}, because {plan['reason']}.",
        f"- {plan['epochs']} epochs of {plan['steps_per_epoch']} step{'s' if plan['steps_per_epoch'] > 1 else ''} "
        f"({plan['total_steps']} optimizer steps) at batch {plan['batch_size']}",
        f"- {rates}",
        f"- weight decay {settings['weight_decay']:g}, loss weight {settings['lm_loss_weight']:g}"
        f"{' on the answer only' if qa and plan['answer_loss_only'] else ''}, LM dropout "
        f"{'on' if plan['dropout'] else 'off'}, seed {settings['seed']}",
        f"- validation {every}, {stopping}; started from "
        f"{'the base task' + chr(39) + 's adapter' if plan['init_from_base'] else 'a fresh adapter'}",
        f"- the rule: the paper's recipe when it gives at least {PAPER_MIN_STEPS:,} optimizer steps on the data, "
        "else the small-data recipe, which starts from the base task's adapter when there is one",
        f"- departures from the original: no augmentation, encoder features {features} (the encoder in eval mode), "
        "video frames from the middle of each segment (the original drew them at random), texts cut to the LM's "
        "positions",
    ]
    return "\n".join(lines)


def model_card(task: Task, config: dict, progress: dict, metric: str, parameters: int, usage: str | Path) -> str:
    """README.md of a trained adapter folder: its data, recipe, ending and every validation."""
    training = config["training"]
    data, plan = training["data"], training["plan"]
    validated = [h for h in progress["history"] if metric in h]
    baseline = progress["baseline"]
    names = [k for k in baseline if k not in _NOT_METRICS]
    rows = [f"| 0 (before training) | | {' | '.join(f'{baseline[k]:.4f}' for k in names)} |"]
    rows += [
        f"| {h['epoch']} | {h['train_loss']:.4f} | {' | '.join(f'{h[k]:.4f}' for k in names)} |" for h in validated
    ]
    best = training["best"]
    ending = training.get("summary") or f"Best {metric} so far: {best[metric]:.4f} at epoch {best['epoch']}."
    if training.get("stopped"):
        ending += f" {training['stopped'][0].upper()}{training['stopped'][1:]}."
    tiny = " (tiny random test models)" if config["tiny"] else ""
    command = "caption" if task.kind == "caption" else "ask -q 'your question?'"
    head = (
        f"Connector and soft prompt ({parameters:,} parameters) trained with epalm-demo on top of the frozen\n"
        f"models of the task `{task.id}`{tiny}."
    )
    cut = f", {data['cut_texts']} texts cut to the LM's positions" if data["cut_texts"] else ""
    return (
        model_card_head(task, config["title"], head)
        + f"""
## Data
`{data["source"]}`: {data["train"]} training and {data["validation"]} validation rows
(validation: {data["validation_source"]}), {data["skipped_rows"]} bad rows skipped{cut}.

## Recipe
{_recipe(plan, training["settings"], training["peak_lrs"], task.kind == "qa")}

## Result
{ending}

| epoch | train loss | {" | ".join(names)} |
|---|---|{"---|" * len(names)}
{chr(10).join(rows)}

## Use
    python -m epalm {command} FILE --adapter {usage}{" --tiny" if config["tiny"] else ""}
"""
    )
