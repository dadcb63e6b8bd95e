"""How an adapter is trained: every setting `train` takes (`TrainConfig`, their one home), the rule that
chooses a recipe for the data (`plan`), the two learning-rate schedules and the optimizer's groups.

Two recipes (docs/training.md gives the reasons):
- "paper": the base task's registry `training` entry, run as the original ran it (docs/original.md,
  "Training"): its epochs, batch and learning rates, timm's warm-up at iterations 0, 100, .. of the
  first epoch then one cosine step per epoch, only optimizer group 0 scheduled, LM dropout on,
  validation every epoch, no early stopping, a fresh adapter.
- "small": sized in optimizer steps for folder-sized data. `SMALL_PASSES` passes over the data,
  kept within `SMALL_MIN_STEPS`..`SMALL_MAX_STEPS` steps; each weight tensor's learning rate is its
  own RMS × `TRAVEL` / steps (a tensor can move a few times its own scale over the run, whatever
  the run's length or the model's width, as LAMB scales a layer's step by its weights' norm);
  linear warm-up over `WARMUP_FRACTION` of the steps, then cosine to 0; the LM without dropout and,
  for QA, the loss on the answer only (measured on the tiny models: train-mode dropout and the
  question's loss slow learning there, and the question is given at inference); about
  `VALIDATIONS` validations; stop after `PATIENCE` validations without improvement; from the base
  task's adapter when it has one.
The rule ("auto"): the paper recipe when it gives at least `PAPER_MIN_STEPS` optimizer steps on the
data (its learning rates were made for its long runs: 24k-283k steps), else the small recipe.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # light to import: the command line reads its defaults from here before torch loads
    from torch import nn

    from .tasks import Task, TrainingRecipe

RECIPES = ("auto", "paper", "small")
PAPER_MIN_STEPS = 20_000  # the released adapters had 24k (MSVD-QA) to 283k (COCO captions) steps
PAPER_WARMUP_STEPS = 4  # timm's warm-up: 4 scheduler steps, one every `warmup_every` iterations of epoch 0
SMALL_BATCH = 16
SMALL_PASSES = 20
SMALL_MIN_STEPS = 300
SMALL_MAX_STEPS = 5_000
SMALL_DROPOUT = False
SMALL_ANSWER_LOSS_ONLY = True
TRAVEL = 8.0
WARMUP_FRACTION = 0.05
VALIDATIONS = 10
PATIENCE = 3
MIN_IMPROVEMENT = 0.01  # a validation loss lower by this fraction is an improvement, whatever the metric did
MIN_GAIN = 1e-3  # a metric higher by less (CIDEr 0.0000026 over 0) has not beaten the adapter a run started from


class ConfigError(UserError, ValueError):
    """A training setting that cannot be used; the message names it."""


@dataclass
class TrainConfig:
    """Everything `train` can be told, with its default. `None`: the recipe chooses (`plan`)."""

    recipe: str = "auto"  # "auto" (the rule), "paper" or "small"
    epochs: int | None = None
    batch_size: int | None = None  # per process
    lr: float | None = None  # paper: the registry's; small: each weight tensor's own (module docstring)
    prompt_lr: float | None = None  # the prompt's (paper: QA tasks only, as the original)
    warmup_lr: float | None = None  # paper only: where the warm-up starts
    min_lr: float | None = None  # paper only: where the cosine ends
    warmup_steps: int | None = None  # paper: timm's warm-up steps (4); small: optimizer steps (5% of them)
    warmup_every: int = 100  # paper: iterations between the warm-up's steps
    weight_decay: float = 0.02
    lm_loss_weight: float = 0.1
    answer_loss_only: bool | None = None  # QA: no loss on the question (paper: False, as the original; small: True)
    schedule_all_groups: bool = False  # paper: the original moves only optimizer group 0
    dropout: bool | None = None  # the LM in train mode (paper: on, as the original; small: off)
    init_from_base: bool | None = None  # start from the base task's adapter (small: when it has one)
    validate_every: int | None = None  # epochs between validations (paper: 1)
    patience: int | None = None  # validations without improvement before stopping (paper: 0, never)
    seed: int = 42
    device: str = "auto"  # "cpu" forces the CPU; otherwise accelerate's choice (its launcher's, per process)
    dtype: str | None = None  # the frozen models' weights; the adapter is always float32
    mixed_precision: str | None = None  # "no", "fp16", "bf16" (autocast, a grad scaler for fp16, by accelerate);
    # None: "no" on CPU, on a GPU that of the frozen weights' dtype (float16 by default), as the accelerate recipe
    cache_features: bool = True  # encode each file once, before the first epoch
    gradient_checkpointing: bool = False  # recompute the LM's activations in the backward pass (large LMs)
    resume: bool = False  # continue the interrupted run of this output folder
    overwrite: bool = False  # replace the adapter already in the output folder once this run finishes
    split: str | None = None  # the dataset's training split (default: train)
    media_column: str | None = None  # default: file_name (folders), the image/audio/video column (datasets)
    text_column: str = "text"
    question_column: str = "question"
    answer_column: str = "answer"
    validation_fraction: float = 0.1  # held out when the data has no validation or test split
    skip_bad: bool = True  # False: refuse the data when any row is bad
    eval_beams: int | None = None  # validation decoding (None: the task's, 3 beams)
    eval_max_new_tokens: int | None = None  # validation decoding length (None: the task's max_length)
    tiny: bool = False
    registry: str | None = None
    push_to_hub: str | None = None
    progress: bool = True
    log_every: int = 10  # steps between the training-loss lines of log.jsonl (every epoch also gets one)

    def __post_init__(self) -> None:
        problems = []
        if self.recipe not in RECIPES:
            problems.append(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        for name in ("epochs", "batch_size", "warmup_every", "validate_every", "eval_beams", "eval_max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{_named(name)} must be at least 1, got {getattr(self, name)}")
        if self.log_every < 1:
            problems.append(f"{_named('log_every')} must be at least 1, got {self.log_every}")
        for name in ("lr", "prompt_lr", "warmup_lr", "min_lr", "weight_decay", "lm_loss_weight", "warmup_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                problems.append(f"{_named(name)} must not be negative, got {getattr(self, name)}")
        if self.patience is not None and self.patience < 0:
            problems.append(f"{_named('patience')} must be 0 (never stop early) or more, got {self.patience}")
        if not 0 < self.validation_fraction < 1:
            problems.append(f"{_named('validation_fraction')} must be between 0 and 1, got {self.validation_fraction}")
        if self.resume and self.overwrite:
            problems.append("resume and overwrite exclude each other: continue the interrupted run, or start over")
        if problems:
            raise ConfigError("; ".join(problems))


def _named(field_name: str) -> str:
    """`batch_size (--batch-size)`: the setting as the Python API and the command line call it."""
    return f"{field_name} (--{field_name.replace('_', '-')})"


@dataclass(frozen=True)
class Plan:
    """What one run does: its recipe with every value chosen, and why (written to the log and card)."""

    recipe: str  # "paper" or "small"
    reason: str
    epochs: int
    batch_size: int
    steps_per_epoch: int
    lr: float | None  # small: None, each tensor's own
    prompt_lr: float | None
    warmup_lr: float | None
    min_lr: float | None
    warmup_steps: int
    warmup_every: int
    schedule_all_groups: bool
    dropout: bool
    answer_loss_only: bool
    init_from_base: bool
    validate_every: int
    patience: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def validates(self, epoch: int) -> bool:
        """Whether epoch `epoch` (0-based) ends with a validation: every `validate_every`-th, and the last."""
        return (epoch + 1) % self.validate_every == 0 or epoch + 1 == self.epochs

    def as_dict(self) -> dict:
        return {**asdict(self), "total_steps": self.total_steps}


def plan(config: TrainConfig, task: Task, rows: int, processes: int = 1, base_adapter: bool = True) -> Plan:
    """The recipe for `rows` training rows on `processes` processes (module docstring); `base_adapter`:
    whether the base task has an adapter to start from."""
    paper = task.training
    paper_steps = paper.epochs * math.ceil(rows / (paper.batch_size * processes)) if paper else None
    recipe = config.recipe
    if recipe == "auto":  # the reason completes "this recipe, because ..."
        if paper_steps is not None and paper_steps >= PAPER_MIN_STEPS:
            recipe = "paper"
            reason = (
                f"it gives {paper_steps:,} optimizer steps on these {rows:,} rows, at least {PAPER_MIN_STEPS:,} "
                "(its learning rates were made for long runs)"
            )
        elif paper_steps is not None:
            recipe = "small"
            reason = (
                f"the paper's recipe would give {paper_steps:,} optimizer steps on these {rows:,} rows "
                f"({paper.epochs} epochs at batch {paper.batch_size}), too few for its learning rate {paper.lr:g} "
                "(its adapters had about 24,000 to 283,000)"
            )
        else:
            recipe = "small"
            reason = f"the task '{task.id}' states no paper recipe"
    else:
        reason = f"--recipe {recipe} was asked for"
    if recipe == "paper":
        if paper is None:
            raise ConfigError(
                f"the task '{task.id}' states no paper recipe (a `training:` entry in its registry): "
                "use --recipe small, or add one"
            )
        return _paper_plan(config, paper, rows, processes, reason)
    return _small_plan(config, paper.batch_size if paper else SMALL_BATCH, rows, processes, base_adapter, reason)


def _chosen(given, default):
    return default if given is None else given


def _paper_plan(config: TrainConfig, paper: TrainingRecipe, rows: int, processes: int, reason: str) -> Plan:
    batch = _chosen(config.batch_size, paper.batch_size)
    return Plan(
        recipe="paper",
        reason=reason,
        epochs=_chosen(config.epochs, paper.epochs),
        batch_size=batch,
        steps_per_epoch=math.ceil(rows / (batch * processes)),
        lr=_chosen(config.lr, paper.lr),
        prompt_lr=_chosen(config.prompt_lr, paper.prompt_lr),
        warmup_lr=_chosen(config.warmup_lr, paper.warmup_lr),
        min_lr=_chosen(config.min_lr, paper.min_lr),
        warmup_steps=_chosen(config.warmup_steps, PAPER_WARMUP_STEPS),
        warmup_every=config.warmup_every,
        schedule_all_groups=config.schedule_all_groups,
        dropout=_chosen(config.dropout, True),
        answer_loss_only=_chosen(config.answer_loss_only, False),
        init_from_base=_chosen(config.init_from_base, False),
        validate_every=_chosen(config.validate_every, 1),
        patience=_chosen(config.patience, 0),
    )


def _small_plan(
    config: TrainConfig, paper_batch: int, rows: int, processes: int, base_adapter: bool, reason: str
) -> Plan:
    batch = _chosen(config.batch_size, min(SMALL_BATCH, paper_batch))
    per_epoch = math.ceil(rows / (batch * processes))
    steps = min(max(SMALL_PASSES * per_epoch, SMALL_MIN_STEPS), SMALL_MAX_STEPS)
    epochs = _chosen(config.epochs, math.ceil(steps / per_epoch))
    return Plan(
        recipe="small",
        reason=reason,
        epochs=epochs,
        batch_size=batch,
        steps_per_epoch=per_epoch,
        lr=config.lr,
        prompt_lr=config.prompt_lr,
        warmup_lr=None,
        min_lr=None,
        warmup_steps=_chosen(config.warmup_steps, max(1, round(WARMUP_FRACTION * epochs * per_epoch))),
        warmup_every=config.warmup_every,
        schedule_all_groups=True,
        dropout=_chosen(config.dropout, SMALL_DROPOUT),
        answer_loss_only=_chosen(config.answer_loss_only, SMALL_ANSWER_LOSS_ONLY),
        init_from_base=_chosen(config.init_from_base, base_adapter),
        validate_every=_chosen(config.validate_every, max(1, math.ceil(epochs / VALIDATIONS))),
        patience=_chosen(config.patience, PATIENCE),
    )


def paper_lr(plan: Plan, epoch: int, iteration: int) -> float:
    """timm's CosineLRScheduler as the original stepped it: warm-up steps at iterations 0, 100, ..
    of epoch 0, then one cosine step per epoch."""
    if epoch == 0:
        t = min(iteration // plan.warmup_every, plan.warmup_steps)
        if t < plan.warmup_steps:
            return plan.warmup_lr + t * (plan.lr - plan.warmup_lr) / plan.warmup_steps
        return plan.lr
    return plan.min_lr + 0.5 * (plan.lr - plan.min_lr) * (1 + math.cos(math.pi * epoch / plan.epochs))


def small_factor(plan: Plan, step: int) -> float:
    """The small recipe's share of the peak learning rate at optimizer step `step` (0-based, over the
    run): linear warm-up, then cosine to 0."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    done = (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def set_lr(groups: list[dict], plan: Plan, epoch: int, iteration: int) -> None:
    """Each optimizer group's learning rate for iteration `iteration` of epoch `epoch`."""
    if plan.recipe == "paper":
        lr = paper_lr(plan, epoch, iteration)
        for group in groups if plan.schedule_all_groups else groups[:1]:
            group["lr"] = lr
        return
    factor = small_factor(plan, epoch * plan.steps_per_epoch + iteration)
    for group in groups:
        group["lr"] = group["peak_lr"] * factor


def parameter_groups(adapter: nn.Module, task: Task, plan: Plan, weight_decay: float) -> list[dict]:
    """AdamW's groups; group 0 is the one the paper's schedule moves."""
    named = list(adapter.named_parameters())
    if plan.recipe == "paper":  # the original scripts' groups (docs/original.md, "Training")
        if task.kind == "qa":
            connector = [p for n, p in named if "prompt" not in n]
            prompt = [p for n, p in named if "prompt" in n]
            return [
                {"params": connector, "lr": plan.lr, "peak_lr": plan.lr, "weight_decay": weight_decay},
                {"params": prompt, "lr": plan.prompt_lr, "peak_lr": plan.prompt_lr, "weight_decay": weight_decay},
            ]
        no_decay = [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")]
        decay = [p for n, p in named if not (p.ndim <= 1 or n.endswith(".bias"))]
        return [
            {"params": no_decay, "lr": plan.lr, "peak_lr": plan.lr, "weight_decay": 0.0},
            {"params": decay, "lr": plan.lr, "peak_lr": plan.lr, "weight_decay": weight_decay},
        ]
    groups = []
    for name, module in adapter.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if "weight" not in own:
            continue
        given = plan.prompt_lr if "prompt" in name and plan.prompt_lr is not None else plan.lr
        scale = own["weight"].detach().float().pow(2).mean().sqrt().item()
        lr = given if given is not None else TRAVEL * scale / plan.total_steps
        for kind, param in own.items():
            decay = weight_decay if kind == "weight" else 0.0
            groups.append({"params": [param], "lr": lr, "peak_lr": lr, "weight_decay": decay, "name": f"{name}.{kind}"})
    return groups


def settings(config: TrainConfig) -> dict:
    """The settings a run is defined by (saved with its state: `--resume` must be given the same)."""
    skip = {"resume", "overwrite", "progress", "push_to_hub", "registry", "device", "log_every"}
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in skip}
