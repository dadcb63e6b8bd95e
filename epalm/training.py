"""Train a new adapter (connectors + soft prompt) on a folder of examples, by the paper's recipe.

The frozen LM and encoder come from a base task of the registry, which also gives the injection
settings, the text format and the preprocessing; only the adapter gets gradients and optimizer
state. The forward is `epalm.model.EPALM`, the one inference runs, and validation decodes with
`epalm.decoding`, so the validation answers are the ones the CLI and the app will give.

The recipe by default is the one the released adapters were trained with (epalm-facts §6):
- loss: per-sample sum of token cross-entropy over all non-pad text positions (BOS excepted),
  summed over the batch, divided by the batch size, times `lm_loss_weight` 0.1;
- AdamW (0.9, 0.999, 1e-8), weight decay 0.02, no clipping, no accumulation;
- parameter groups as the scripts built them: captioning puts biases (no decay) and weights
  (decay) in two groups at `lr` and ignores `prompt_lr`; QA puts the connector in group 0 at `lr`
  and the prompt in group 1 at `prompt_lr`;
- schedule: warm-up from `warmup_lr` to `lr` in 4 steps at iterations 0, 100, .., 400 of the first
  epoch, then cosine to `min_lr` per epoch; as in the original (`scheduler_groups: 0`) only group
  0 follows it, group 1 keeps its initial lr (`schedule_all_groups=True` schedules both);
- the LM in train mode (OPT's dropout 0.1, embedding dropout included); seed 42; validation
  each epoch with the task's metric (CIDEr for captions, VQA accuracy for QA), best kept.
Deviations, on purpose: no random augmentation (the original's RandomResizedCrop/RandAugment and
audio masking) and the encoder in eval mode (no TimeSformer drop-path), so that each file's
[CLS] features are computed once and reused every epoch (`cache_features`); validation decodes
one file at a time with the task's decoding (3 beams), as the demo answers.

Devices, mixed precision and processes are `accelerate`'s: `accelerate launch -m epalm train ...`
runs data-parallel on several GPUs or machines.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from .adapter_format import model_card_head, save_adapter
from .data import DataError, Dataset, Example, decode_all, detect_kind, load_folder
from .decoding import generate
from .errors import WeightsUnavailable
from .metrics import caption_scores, exact_match, vqa_accuracy
from .model import EPALM, Adapter
from .publish import check_push, push_to_hub
from .refs import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .tasks import AdapterConfig, Task

log = logging.getLogger(__name__)

LAST = "last"  # sub-folder of the output with the state --resume continues from
LOG_FILE = "log.jsonl"
PUBLISHED = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, "README.md", LOG_FILE]


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings of one released adapter's config (epalm-facts §1, §6)."""

    epochs: int
    batch_size: int
    lr: float
    prompt_lr: float
    warmup_lr: float
    min_lr: float


_BASE = dict(lr=2e-5, prompt_lr=1e-5, warmup_lr=1e-5, min_lr=1e-6)  # OPT-2.7B configs
_PT_L = dict(lr=2e-4, prompt_lr=1e-3, warmup_lr=1e-4, min_lr=1e-5)  # OPT-6.7B + ViT-L configs
RECIPES: dict[str, Recipe] = {
    "image-caption": Recipe(8, 16, **_BASE),
    "image-vqa": Recipe(8, 64, **_BASE),
    "image-gqa": Recipe(8, 64, **_BASE),
    "video-caption": Recipe(26, 16, **_BASE),
    "video-qa-msrvtt": Recipe(26, 8, **_BASE),
    "video-qa-msvd": Recipe(26, 8, **_BASE),
    "audio-caption": Recipe(30, 8, **_BASE),
    "image-caption-L": Recipe(35, 2, **_PT_L),
    "image-vqa-L": Recipe(35, 2, **_PT_L),
    "image-gqa-L": Recipe(35, 8, **_PT_L),
}


def paper_recipe(task: Task) -> Recipe:
    """The recipe of the released adapter `task` was trained with; for a task of the user's
    registry, that of the released task with the same adapter shape."""
    if task.id in RECIPES:
        return RECIPES[task.id]
    if task.injection.shared_connector and not task.injection.prompt_mlp:
        return RECIPES["image-caption-L" if task.kind == "caption" else "image-vqa-L"]
    return (
        RECIPES[f"{task.modality}-caption"]
        if task.kind == "caption"
        else (RECIPES["video-qa-msrvtt" if task.modality == "video" else "image-vqa"])
    )


@dataclass
class TrainConfig:
    """Everything `train` can be told. `None` means: the base task's recipe (`paper_recipe`)."""

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    prompt_lr: float | None = None
    warmup_lr: float | None = None
    min_lr: float | None = None
    weight_decay: float = 0.02
    lm_loss_weight: float = 0.1
    answer_loss_only: bool = False  # QA: no loss on the question tokens (the original's loss covers them)
    warmup_steps: int = 4  # the warm-up's scheduler steps, one every `warmup_every` iterations of epoch 0
    warmup_every: int = 100
    schedule_all_groups: bool = False  # the original moves only optimizer group 0
    dropout: bool = True  # the LM in train mode, as the original
    seed: int = 42
    device: str = "auto"  # "cpu" forces the CPU; otherwise accelerate's choice (its launcher's, per process)
    dtype: str | None = None  # the frozen models' weights; the adapter is always float32
    mixed_precision: str | None = None  # "no", "fp16", "bf16" (autocast, a grad scaler for fp16, by accelerate);
    # None: "no" on CPU, on a GPU that of the frozen weights' dtype (float16 by default), as the accelerate recipe
    cache_features: bool = True  # encode each file once, before the first epoch
    gradient_checkpointing: bool = False  # recompute the LM's activations in the backward pass (large LMs)
    init_from_base: bool = False  # start from the base task's released adapter instead of a fresh one
    resume: bool = False  # continue from OUT/last
    validation_fraction: float = 0.1
    skip_bad: bool = True  # False: refuse the data when any row is bad
    eval_beams: int | None = None  # validation decoding (None: the task's, 3 beams)
    eval_max_new_tokens: int | None = None  # validation decoding length (None: the task's max_length)
    tiny: bool = False
    registry: str | None = None
    push_to_hub: str | None = None
    progress: bool = True
    log_every: int = 10  # steps between the training-loss lines of log.jsonl (every epoch also gets one)

    def resolved(self, task: Task) -> TrainConfig:
        recipe = paper_recipe(task)
        return replace(self, **{k: getattr(recipe, k) for k in asdict(recipe) if getattr(self, k) is None})


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the state was saved and `--resume` continues from it."""


@dataclass
class TrainResult:
    out: Path  # the adapter folder (best checkpoint by the validation metric)
    metric: str
    best: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    url: str | None = None  # the Hub repo it was uploaded to (`push_to_hub`)
    main_process: bool = True  # with several processes, only the main one writes files and reports


class AdapterLoss(nn.Module):
    """The module that trains: the adapter, and the frozen LM's loss when driven by it.

    The LM is an argument, not a submodule, so data-parallel wrappers and checkpoints hold only
    the adapter."""

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        lm: EPALM,
    ) -> torch.Tensor:
        """Per-sample sum of the token cross-entropy of `labels` (-100: no target) after BOS: the
        text logits predict the next token, visual and prompt positions predict nothing."""
        logits = lm(input_ids, attention_mask, self.adapter.prefix(features))[:, -input_ids.shape[1] : -1]
        return nn.functional.cross_entropy(logits.float().transpose(1, 2), labels[:, 1:], reduction="none").sum(1)


class EpochSampler(Sampler[int]):
    """A fresh seeded permutation each epoch: the order of epoch e is known again on --resume.
    (Not `set_epoch`: accelerate would set that from its own count of passes, which restarts at 0.)"""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def scheduled_lr(config: TrainConfig, epoch: int, iteration: int) -> float:
    """timm's CosineLRScheduler as the original stepped it: warm-up steps at iterations 0, 100, ..
    of epoch 0, then one cosine step per epoch."""
    if epoch == 0:
        t = min(iteration // config.warmup_every, config.warmup_steps)
        if t < config.warmup_steps:
            return config.warmup_lr + t * (config.lr - config.warmup_lr) / config.warmup_steps
        return config.lr
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * epoch / config.epochs))


def parameter_groups(adapter: Adapter, task: Task, config: TrainConfig) -> list[dict]:
    """The original scripts' AdamW groups (module docstring); group 0 is the scheduled one."""
    named = list(adapter.named_parameters())
    if task.kind == "qa":
        return [
            {
                "params": [p for n, p in named if "prompt" not in n],
                "lr": config.lr,
                "weight_decay": config.weight_decay,
            },
            {
                "params": [p for n, p in named if "prompt" in n],
                "lr": config.prompt_lr,
                "weight_decay": config.weight_decay,
            },
        ]
    no_decay = [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")]
    decay = [p for n, p in named if not (p.ndim <= 1 or n.endswith(".bias"))]
    return [
        {"params": no_decay, "lr": config.lr, "weight_decay": 0.0},
        {"params": decay, "lr": config.lr, "weight_decay": config.weight_decay},
    ]


class Trainer:
    """One training run; `train()` is the entry point."""

    def __init__(self, data: str | Path, base: str, out: str | Path, config: TrainConfig, pipeline: Any = None) -> None:
        from accelerate import Accelerator

        from .pipeline import _PREPARE, Pipeline
        from .store import resolve_dtype

        if pipeline is not None and pipeline.store.pack_weights:
            raise ValueError("training needs the LM's plain weights: pass a Pipeline(pack_weights=False)")
        if config.push_to_hub:  # no token or a bad repo id: said now, not after the training
            check_push(config.push_to_hub)
        cpu = config.device == "cpu" or not torch.cuda.is_available()
        precision = config.mixed_precision
        if precision is None:
            frozen = resolve_dtype(config.dtype, torch.device("cpu" if cpu else "cuda"))
            precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(frozen, "no") if not cpu else "no"
        self.accelerator = Accelerator(mixed_precision=precision, cpu=cpu)
        device = str(self.accelerator.device)
        if pipeline is None:
            from .tasks import load_registry

            registry = load_registry(config.registry) if config.registry else None
            pipeline = Pipeline(
                device=device, dtype=config.dtype, tiny=config.tiny, registry=registry, pack_weights=False
            )
        self.pipeline = pipeline
        self.task = pipeline.task(base)
        self.config = replace(config.resolved(self.task), mixed_precision=precision)
        self.out = Path(out).expanduser().resolve()
        self.device = self.accelerator.device
        self.prepare: Callable[[Path], torch.Tensor] = lambda path: _PREPARE[self.task.modality](
            path, self.task.preprocess, pipeline.limits
        )
        self.dataset = self._load_data(data)
        self.lm, self.tokenizer = pipeline.lm(self.task)
        self.encoder = pipeline.encoder(self.task)
        self.features: dict[Path, torch.Tensor] = {}

    def _load_data(self, data: str | Path) -> Dataset:
        found = detect_kind(Path(data).expanduser())
        if found != self.task.kind:
            columns = "question and answer" if found == "qa" else "text"
            raise DataError(
                f"the data has {columns} columns, but the base task '{self.task.id}' is a {self.task.kind} task"
            )
        return load_folder(
            data, self.task.kind, self.config.validation_fraction, self.config.seed, self.config.skip_bad
        )

    # -- features ----------------------------------------------------------------------------

    @torch.no_grad()
    def _encode(self, media: torch.Tensor) -> torch.Tensor:
        """[B, ...] prepared media -> [N, B, dim] [CLS] features of the frozen encoder."""
        return self.encoder(media.to(self.device), self.task.injection.num_features).float()

    def _scan(self) -> None:
        """Decode every file once (bad ones are found now); keep its features when caching."""
        started = time.perf_counter()
        keep = self.config.cache_features

        def use(example: Example, media: torch.Tensor) -> None:
            if keep and example.path not in self.features:
                self.features[example.path] = self._encode(media[None])[:, 0].cpu()

        decode_all(self.dataset, self.prepare, use, self.config.skip_bad)
        what = "decoded and encoded" if keep else "decoded"
        log.info(
            "%s %d files in %.1f s",
            what,
            len(self.dataset.train) + len(self.dataset.validation),
            time.perf_counter() - started,
        )

    def _media_features(self, examples: list[Example]) -> torch.Tensor:
        if self.config.cache_features:
            return torch.stack([self.features[e.path] for e in examples], dim=1).to(self.device)
        return self._encode(torch.stack([self.prepare(e.path) for e in examples]))

    def _collate(self, examples: list[Example]) -> dict[str, Any]:
        ids = [self.task.text.training_ids(self.tokenizer, e.question, e.answer) for e in examples]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        labels = torch.full((len(ids), width), -100, dtype=torch.long)
        for row, (seq, example) in enumerate(zip(ids, examples)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            start = (
                len(self.task.text.prompt_ids(self.tokenizer, example.question)) if self.config.answer_loss_only else 0
            )
            labels[row, start : len(seq)] = input_ids[row, start : len(seq)]
        return {"examples": examples, "input_ids": input_ids, "attention_mask": mask, "labels": labels}

    # -- validation --------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, adapter: Adapter, example: Example) -> str:
        """The answer the inference path gives for `example` (one file, the task's decoding)."""
        options = self.task.generation
        if self.config.eval_beams is not None:
            options = replace(options, num_beams=self.config.eval_beams)
        if self.config.eval_max_new_tokens is not None:
            options = replace(options, max_new_tokens=self.config.eval_max_new_tokens)
        options = replace(options, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        ids = torch.tensor([self.task.text.prompt_ids(self.tokenizer, example.question)], device=self.device)
        prefix = adapter.prefix(self._media_features([example]))
        output = generate(self.lm, prefix, ids, torch.ones_like(ids), options).sequences[0, ids.shape[1] :]
        return self.tokenizer.decode(output, skip_special_tokens=True).strip()

    @property
    def metric(self) -> str:
        return "CIDEr" if self.task.kind == "caption" else "VQA accuracy"

    @torch.no_grad()
    def validation_loss(self, model: AdapterLoss) -> float:
        """The training loss on the validation rows (it breaks ties of the metric)."""
        examples, total = self.dataset.validation, 0.0
        for start in range(0, len(examples), self.config.batch_size):
            batch = self._collate(examples[start : start + self.config.batch_size])
            with self.accelerator.autocast():
                per_sample = model(
                    self._media_features(batch["examples"]),
                    batch["input_ids"].to(self.device),
                    batch["attention_mask"].to(self.device),
                    batch["labels"].to(self.device),
                    self.lm,
                )
            total += per_sample.sum().item()
        return total / len(examples) * self.config.lm_loss_weight

    def validate(self, model: AdapterLoss) -> dict[str, float]:
        """The task's metric (and exact match) of the inference path's answers, and the loss."""
        self.lm.eval()
        model.eval()
        adapter = model.adapter
        examples = self.dataset.validation
        answers: dict[tuple[Path, str | None], str] = {}
        for e in examples:  # one decode per file and question: a file's k captions are one thing to describe
            if (e.path, e.question) not in answers:
                answers[e.path, e.question] = self.predict(adapter, e)
        predictions = [answers[e.path, e.question] for e in examples]
        if self.task.kind == "caption":
            references: dict[Path, list[str]] = {}
            for e in examples:  # every caption of a file is a reference for it; each file is scored once
                references.setdefault(e.path, []).append(e.answer)
            scores = caption_scores([answers[path, None] for path in references], list(references.values()))
            scores = {"CIDEr": scores["CIDEr"], "BLEU-4": scores["BLEU-4"]}
        else:
            scores = {"VQA accuracy": vqa_accuracy(predictions, [[e.answer] for e in examples])}
        scores["exact match"] = exact_match(predictions, [e.answer for e in examples])
        scores["validation_loss"] = self.validation_loss(model)
        return scores

    # -- output ------------------------------------------------------------------------------

    def _write_log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with (self.out / LOG_FILE).open("a") as log_file:
                log_file.write(json.dumps(record) + "\n")

    def _save_best(self, adapter: Adapter, history: list[dict], best: dict) -> None:
        name = self.dataset.root.name
        config = AdapterConfig(
            # its own title and menu label, not the base task's
            replace(
                self.task, title=f"{self.task.title}, trained on {name}", label=f"{self.task.label}, trained on {name}"
            ),
            base_task=self.task.id,
            tiny=self.pipeline.random_weights,
            training={
                "data": self.dataset.summary(),
                "recipe": {
                    k: v for k, v in asdict(self.config).items() if k not in ("push_to_hub", "progress", "registry")
                },
                "best": best,
            },
        )
        save_adapter(adapter.state_dict(), config, self._model_card(config.to_dict(), history), self.out)

    def _model_card(self, config: dict, history: list[dict]) -> str:
        data, recipe, best = config["training"]["data"], config["training"]["recipe"], config["training"]["best"]
        rows = "\n".join(
            f"| {h['epoch']} | {h['train_loss']:.4f} | "
            + " | ".join(f"{h[k]:.4f}" for k in h if k not in ("epoch", "train_loss", "event", "samples_per_s"))
            + " |"
            for h in history
        )
        names = [k for k in history[0] if k not in ("epoch", "train_loss", "event", "samples_per_s")] if history else []
        task = self.task
        tiny = " (tiny random test models)" if config["tiny"] else ""
        features = "cached" if recipe["cache_features"] else "computed each step"
        command = "caption" if task.kind == "caption" else "ask -q 'your question?'"
        parameters = sum(p.numel() for p in self._adapter().parameters())
        summary = (
            f"Connector and soft prompt ({parameters:,} parameters) trained with epalm-demo on top of the frozen\n"
            f"models of the task `{task.id}`{tiny}."
        )
        return (
            model_card_head(task, config["title"], summary)
            + f"""
## Data
`{data["folder"]}`: {data["train"]} training and {data["validation"]} validation rows
(validation: {data["validation_source"]}), {data["skipped_rows"]} bad rows skipped.

## Recipe
The released adapters' recipe (eP-ALM, ICCV 2023) unless changed: {recipe["epochs"]} epochs, batch
{recipe["batch_size"]}, AdamW lr {recipe["lr"]:g} (prompt lr {recipe["prompt_lr"]:g} for QA), weight decay
{recipe["weight_decay"]:g}, warm-up from {recipe["warmup_lr"]:g} then cosine to {recipe["min_lr"]:g}, loss weight
{recipe["lm_loss_weight"]:g}, LM dropout {"on" if recipe["dropout"] else "off"}, seed {recipe["seed"]}, mixed precision
{recipe["mixed_precision"]}. No augmentation; encoder features {features}.

## Validation
Best {self.metric}: {best.get(self.metric, float("nan")):.4f} at epoch {best.get("epoch")}.

| epoch | train loss | {" | ".join(names)} |
|---|---|{"---|" * len(names)}
{rows}

## Use
    python -m epalm {command} FILE --adapter {self.config.push_to_hub or self.out}{" --tiny" if config["tiny"] else ""}
"""
        )

    def _adapter(self) -> Adapter:
        return self.accelerator.unwrap_model(self.model).adapter

    # -- the loop ----------------------------------------------------------------------------

    def _new_adapter(self) -> Adapter:
        torch.manual_seed(self.config.seed)
        adapter = Adapter(
            self.task.injection, self.encoder.dim, self.lm.config.hidden_size, self.lm.config.word_embed_proj_dim
        )
        if self.config.init_from_base:
            adapter.load_state_dict(self.pipeline.adapter(self.task).state_dict())
        return adapter.to(self.device)

    def run(self) -> TrainResult:
        config, accelerator = self.config, self.accelerator
        torch.manual_seed(config.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        self._scan()
        self.model = AdapterLoss(self._new_adapter())
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model.adapter, self.task, config), betas=(0.9, 0.999), eps=1e-8
        )
        sampler = EpochSampler(len(self.dataset.train), config.seed)
        loader = DataLoader(self.dataset.train, batch_size=config.batch_size, sampler=sampler, collate_fn=self._collate)
        self.model, optimizer, loader = accelerator.prepare(self.model, optimizer, loader)
        self.lm.checkpointing = config.gradient_checkpointing
        progress = {"epoch": 0, "step": 0, "best": None, "history": []}
        last = self.out / LAST
        if config.resume:
            if not (last / "progress.json").is_file():
                raise DataError(f"nothing to resume: {last} holds no training state")
            accelerator.load_state(str(last))
            progress = json.loads((last / "progress.json").read_text())
            log.info("resuming at epoch %d, step %d", progress["epoch"], progress["step"])
        elif (self.out / LOG_FILE).exists():
            (self.out / LOG_FILE).unlink()
        scheduled = optimizer.param_groups if config.schedule_all_groups else optimizer.param_groups[:1]
        try:
            for epoch in range(progress["epoch"], config.epochs):
                progress["epoch"] = epoch
                sampler.use_epoch(epoch)
                # batches done before an interruption are skipped (collated, not run): the order is the epoch's own
                batches = itertools.islice(loader, progress["step"], None)
                self.lm.train(config.dropout)
                self.model.train()
                losses, seen, started = [], 0, time.perf_counter()
                bar = tqdm(
                    batches,
                    total=len(loader),
                    initial=progress["step"],
                    desc=f"epoch {epoch + 1}/{config.epochs}",
                    disable=not (config.progress and accelerator.is_main_process),
                    unit="batch",
                )
                for batch in bar:
                    for group in scheduled:
                        group["lr"] = scheduled_lr(config, epoch, progress["step"])
                    with accelerator.autocast():
                        per_sample = self.model(
                            self._media_features(batch["examples"]),
                            batch["input_ids"],
                            batch["attention_mask"],
                            batch["labels"],
                            self.lm,
                        )
                        loss = per_sample.sum() / len(per_sample) * config.lm_loss_weight
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    progress["step"] += 1
                    losses.append(loss.item())
                    seen += len(per_sample)
                    rate = seen / (time.perf_counter() - started)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_per_s=f"{rate:.1f}")
                    step = epoch * len(loader) + progress["step"]  # counted over the whole run
                    if step % config.log_every == 0:
                        self._write_log(
                            {
                                "event": "step",
                                "epoch": epoch + 1,
                                "step": step,
                                "loss": losses[-1],
                                "lr": optimizer.param_groups[0]["lr"],
                                "group_lrs": [group["lr"] for group in optimizer.param_groups],
                                "samples_per_s": rate,
                            }
                        )
                bar.close()
                record = {
                    "event": "epoch",
                    "epoch": epoch + 1,
                    "train_loss": sum(losses) / max(len(losses), 1),
                    "samples_per_s": seen / (time.perf_counter() - started),
                }
                if accelerator.is_main_process:
                    record.update(self.validate(accelerator.unwrap_model(self.model)))
                    progress["history"].append(record)
                    self._write_log(record)
                    log.info(
                        "epoch %d: %s",
                        epoch + 1,
                        ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)),
                    )
                    if progress["best"] is None or _better(record, progress["best"], self.metric):
                        progress["best"] = {
                            "epoch": epoch + 1,
                            self.metric: record[self.metric],
                            "validation_loss": record["validation_loss"],
                        }
                        self._save_best(self._adapter(), progress["history"], progress["best"])
                progress.update(epoch=epoch + 1, step=0)
                accelerator.wait_for_everyone()
                self._save_last(progress)
        except KeyboardInterrupt as exc:
            self._save_last(progress)
            raise TrainingInterrupted(
                f"Interrupted at epoch {progress['epoch'] + 1}, step {progress['step']}; the state is saved in {last}. "
                f"Run the same command with --resume to continue."
            ) from exc
        finally:
            self.lm.eval()
            self.lm.checkpointing = False
        accelerator.wait_for_everyone()
        if (last / "progress.json").is_file():  # the main process's, with the validation
            progress = json.loads((last / "progress.json").read_text())
        if progress["best"] is None:
            raise DataError("training ran no epoch (is --epochs 0, or was it already finished?)")
        self._refresh_card(progress)
        url = self._push() if config.push_to_hub and accelerator.is_main_process else None
        best = progress["best"]
        history, main = progress["history"], accelerator.is_main_process
        return TrainResult(self.out, self.metric, best[self.metric], best["epoch"], history, url, main)

    def _push(self) -> str:
        """Upload the published files; when that fails, the error says how to upload them later."""
        repo = self.config.push_to_hub
        try:
            return push_to_hub(self.out, repo, allow_patterns=PUBLISHED)
        except WeightsUnavailable as exc:
            include = " ".join(f"--include {name}" for name in PUBLISHED)
            raise WeightsUnavailable(
                f"{exc} The adapter is saved in {self.out}; "
                f"upload it later with `hf upload {repo} {shlex.quote(str(self.out))} {include}`."
            ) from exc

    def _refresh_card(self, progress: dict) -> None:
        """The model card of the best checkpoint, with every epoch's validation."""
        if self.accelerator.is_main_process and (self.out / ADAPTER_CONFIG).is_file():
            config = json.loads((self.out / ADAPTER_CONFIG).read_text())
            (self.out / "README.md").write_text(self._model_card(config, progress["history"]))

    def _save_last(self, progress: dict) -> None:
        last = self.out / LAST
        self.accelerator.save_state(str(last))
        if self.accelerator.is_main_process:
            (last / "progress.json").write_text(json.dumps(progress, indent=1))


def _better(record: dict, best: dict, metric: str) -> bool:
    """A higher metric, or the same with a lower validation loss (small validation sets tie often)."""
    return (record[metric], -record["validation_loss"]) > (best[metric], -best["validation_loss"])


def train(
    data: str | Path,
    base: str,
    out: str | Path,
    config: TrainConfig | None = None,
    pipeline: Any = None,
    **options: Any,
) -> TrainResult:
    """Train an adapter for the base task `base` on the folder `data`; write it to `out`.

        from epalm import train
        train("my-photos/", base="image-caption", out="my-adapter", epochs=3)

    `options` are `TrainConfig` fields; `pipeline` shares already-loaded models (its device and
    dtype are then used)."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown training options: {', '.join(unknown)}")
    config = replace(config or TrainConfig(), **options)
    return Trainer(data, base, out, config, pipeline).run()
