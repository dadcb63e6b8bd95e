"""Train a new adapter (connectors + soft prompt) on your data: `python -m epalm train` / `epalm.train`.

The frozen LM and encoder come from a base task of the registry, which also gives the injection
settings, the text format and the preprocessing; only the adapter gets gradients and optimizer
state. The forward is `epalm.model.EPALM`, the one inference runs, and validation decodes through
one method (`Trainer._answers`) with the task's prompt and decoding, so the validation answers are
the ones the CLI and the app will give. The recipe, and the rule that picks it for the data, are
`epalm.recipe`'s; the original's recipe is described in docs/original.md ("Training").

The loss is the original's: per-sample sum of token cross-entropy over all non-pad text positions
(BOS excepted), summed over the batch, divided by the batch size, times `lm_loss_weight` 0.1.
Departures from the original, on purpose (docs/training.md):
- no random augmentation (the original's RandomResizedCrop / RandAugment and audio masking), the
  encoder in eval mode (no TimeSformer drop-path) and, for video, the middle frame of each segment
  as inference takes it (the original drew a random frame per segment at every epoch): so each
  file's [CLS] features are computed once and reused every epoch (`cache_features`);
- texts longer than the LM's positions are cut, saying so (the original had no limit);
- validation decodes with the task's decoding (3 beams) as the demo answers, several files per call;
- the "small" recipe, the default for data too small for the paper's (see `epalm.recipe`).

A run writes into `OUT.training/` and replaces `OUT` only when it finishes: an interrupted run
leaves the previous adapter as it was. Ctrl-C stops at the next step (or validation batch) with
the state saved, dropout's random state included, so that `--resume` continues to the adapter,
log and model card an uninterrupted run gives, bit for bit.

Devices, mixed precision and processes are `accelerate`'s: `accelerate launch -m epalm train ...`
runs data-parallel on several GPUs or machines.
"""

from __future__ import annotations

import itertools
import logging
import shlex
import signal
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .adapter_format import save_adapter
from .batches import EpochSampler, TokenizedRows
from .data import Columns, DataError, Dataset, Example, check, decode_all, load_data
from .decoding import DecodingOptions
from .engine import Request, decode_together
from .errors import WeightsUnavailable
from .metrics import caption_scores, exact_match, vqa_accuracy
from .model import EPALM, Adapter
from .publish import check_push, push_to_hub
from .recipe import MIN_GAIN, MIN_IMPROVEMENT, ConfigError, Plan, TrainConfig, parameter_groups, plan, set_lr, settings
from .refs import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .run_folder import LOG_FILE, RunFolder
from .tasks import AdapterConfig
from .training_card import model_card, summary

log = logging.getLogger(__name__)

PUBLISHED = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, "README.md", LOG_FILE]
TIMING = ("samples_per_s",)  # the log's fields that differ between two runs of the same training


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says what was saved and how to continue."""


class _Stop(Exception):
    """Raised at a safe point after Ctrl-C: the run's state is consistent there."""


@dataclass
class TrainResult:
    out: Path  # the adapter folder (best checkpoint by the validation metric)
    metric: str
    best: float
    best_epoch: int
    baseline: float  # the metric of the adapter training started from, on the same validation rows
    improved: bool  # whether the best epoch beat it
    summary: str  # the run's ending, as the log and the model card say it
    stopped: str | None = None  # why the run stopped before its last epoch (early stopping)
    history: list[dict] = field(default_factory=list)
    url: str | None = None  # the Hub repo it was uploaded to (`push_to_hub`)
    main_process: bool = True  # with several processes, only the main one writes files and reports
    already_finished: bool = False  # `resume` found the run finished: nothing was trained


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


class _Interrupts:
    """While training: the first Ctrl-C asks the run to stop at its next safe point, where the state is
    saved; a second one stops at once. Outside the main thread Ctrl-C cannot reach the run anyway."""

    def __init__(self, main_process: bool) -> None:
        self.requested, self.main_process = False, main_process
        self._previous: Any = None

    def __enter__(self) -> _Interrupts:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.main_process:
            log.warning(
                "\nCtrl-C: stopping after this step, its state saved (again: at once, back to the last validation)"
            )

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """One training run; `train()` is the entry point."""

    def __init__(self, data: str | Path, base: str, out: str | Path, config: TrainConfig, pipeline: Any = None) -> None:
        from accelerate import Accelerator

        from .pipeline import Pipeline
        from .store import resolve_dtype

        if pipeline is not None and pipeline.store.pack_weights:
            raise ValueError("training needs the LM's plain weights: pass a Pipeline(pack_weights=False)")
        self.config = config
        self.folder = RunFolder(out)
        self.out, self.work = self.folder.out, self.folder.work
        self.finished = self.folder.check(config.resume, config.overwrite)  # before anything loads: said at once
        if self.finished is not None:
            return
        if config.push_to_hub:  # no token or a bad repo id: said now, not after the training
            check_push(config.push_to_hub)
        cpu = config.device == "cpu" or not torch.cuda.is_available()
        precision = config.mixed_precision
        if precision is None:
            frozen = resolve_dtype(config.dtype, torch.device("cpu" if cpu else "cuda"))
            precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(frozen, "no") if not cpu else "no"
        self.precision = precision
        self.accelerator = Accelerator(mixed_precision=precision, cpu=cpu)
        self.device = self.accelerator.device
        if pipeline is None:
            from .tasks import load_registry

            registry = load_registry(config.registry) if config.registry else None
            pipeline = Pipeline(
                device=str(self.device), dtype=config.dtype, tiny=config.tiny, registry=registry, pack_weights=False
            )
        self.pipeline = pipeline
        self.task = pipeline.task(base)
        self.prepare = lambda source: self.task.prepare(source, pipeline.limits)
        columns = Columns(config.media_column, config.text_column, config.question_column, config.answer_column)
        self.dataset: Dataset = load_data(
            data, self.task.kind, config.split, columns, config.validation_fraction, config.seed, config.skip_bad
        )
        self.lm, self.tokenizer = pipeline.lm(self.task)
        self.encoder = pipeline.encoder(self.task)
        self.rows = TokenizedRows(self.dataset, self.task.text, self.tokenizer, self.lm.config.max_position_embeddings)
        check(self.dataset, config.skip_bad)  # the rows whose question left no room
        self.plan: Plan  # chosen once every file is decoded (`_start`): unreadable ones are rows less
        self.decoding = self._decoding_options()
        self.features: dict[str, torch.Tensor] = {}
        self.interrupts = _Interrupts(self.accelerator.is_main_process)
        self.progress: dict = {}

    # -- data ----------------------------------------------------------------------------------

    def _has_base_adapter(self) -> bool:
        """Whether the base task has an adapter to start from (the tiny models give every task one)."""
        source = self.task.adapter
        return self.pipeline.random_weights or bool(source.repo_id) or Path(source.filename).exists()

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
            if keep:
                self.features[example.key] = self._encode(media[None])[:, 0].cpu()

        decode_all(self.dataset, self.prepare, use, self.config.skip_bad)
        files = len({e.key for e in self.dataset.train + self.dataset.validation})
        what = "decoded and encoded" if keep else "decoded"
        self._log(logging.INFO, "%s %d files in %.1f s", what, files, time.perf_counter() - started)

    def _media_features(self, examples: list[Example]) -> torch.Tensor:
        if self.config.cache_features:
            return torch.stack([self.features[e.key] for e in examples], dim=1).to(self.device)
        return self._encode(torch.stack([self.prepare(e.source()) for e in examples]))

    def _collate(self, examples: list[Example]) -> dict[str, Any]:
        return self.rows.collate(examples, self.plan.answer_loss_only)

    def _loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Per-sample losses of one collated batch."""
        with self.accelerator.autocast():
            return model(
                self._media_features(batch["examples"]),
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                batch["labels"].to(self.device),
                self.lm,
            )

    # -- validation --------------------------------------------------------------------------

    def _decoding_options(self) -> DecodingOptions:
        """The task's decoding, as the CLI and the app use it, with the validation overrides."""
        options = self.task.generation
        if self.config.eval_beams is not None:
            options = replace(options, num_beams=self.config.eval_beams)
        if self.config.eval_max_new_tokens is not None:
            options = replace(options, max_new_tokens=self.config.eval_max_new_tokens)
        return replace(options, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)

    @torch.no_grad()
    def _answers(self, adapter: Adapter, examples: list[Example]) -> list[str]:
        """The inference path's answers to `examples`: the task's prompt and decoding, all decoded together
        by the engine (at most the batch's rows a step), each the answer it gets alone."""
        requests, features = [], self._media_features(examples)  # [blocks, examples, dim], encoded together
        for i, example in enumerate(examples):
            ids = torch.tensor([self.task.text.prompt_ids(self.tokenizer, example.question)], device=self.device)
            requests.append(Request(adapter.prefix(features[:, i : i + 1]), ids, self.decoding))
        decode_together(self.lm, requests)
        outputs = [request.result().sequences[0, request.input_ids.shape[1] :] for request in requests]
        return [self.tokenizer.decode(output, skip_special_tokens=True).strip() for output in outputs]

    @property
    def metric(self) -> str:
        return "CIDEr" if self.task.kind == "caption" else "VQA accuracy"

    @torch.no_grad()
    def _validation_loss(self, model: AdapterLoss) -> float:
        """The training loss on the validation rows (it breaks ties of the metric)."""
        examples, total = self.dataset.validation, 0.0
        for start in range(0, len(examples), self.plan.batch_size):
            self._safe_point(every_process=False)
            total += self._loss(model, self._collate(examples[start : start + self.plan.batch_size])).sum().item()
        return total / len(examples) * self.config.lm_loss_weight

    def _validate(self, model: AdapterLoss) -> dict[str, float]:
        """The task's metric (and exact match) of the inference path's answers, and the loss."""
        self.lm.eval()
        model.eval()
        examples = self.dataset.validation
        # one decode per file and question: a file's k captions are one thing to describe
        unique = list({(e.key, e.question): e for e in examples}.values())
        answers: dict[tuple[str, str | None], str] = {}
        for start in range(0, len(unique), self.plan.batch_size):
            self._safe_point(every_process=False)
            chunk = unique[start : start + self.plan.batch_size]
            answers.update(((e.key, e.question), a) for e, a in zip(chunk, self._answers(model.adapter, chunk)))
        predictions = [answers[e.key, e.question] for e in examples]
        if self.task.kind == "caption":
            references: dict[str, list[str]] = {}
            for e in examples:  # every caption of a file is a reference for it; each file is scored once
                references.setdefault(e.key, []).append(e.answer)
            scores = caption_scores([answers[key, None] for key in references], list(references.values()))
            scores = {"CIDEr": scores["CIDEr"], "BLEU-4": scores["BLEU-4"]}
        else:
            scores = {"VQA accuracy": vqa_accuracy(predictions, [[e.answer] for e in examples])}
        scores["exact match"] = exact_match(predictions, [e.answer for e in examples])
        scores["validation_loss"] = self._validation_loss(model)
        return scores

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        if self.finished is not None:
            return _finished_result(self.out, self.finished)
        unchanged = f" ({self.out} is as it was)" if self.out.exists() else ""
        try:
            self._start()
        except BaseException as exc:  # before the first saved state there is nothing to continue from
            if not self.config.resume and self.accelerator.is_main_process:
                self.folder.discard()
            if isinstance(exc, KeyboardInterrupt):
                raise TrainingInterrupted(
                    f"Interrupted before training started; nothing was saved{unchanged}."
                ) from None
            raise
        try:
            with self.interrupts:
                for epoch in range(self.progress["epoch"], self.plan.epochs):
                    self._train_epoch(epoch)
                    self._end_epoch(epoch)
                    if self.plan.validates(epoch) or self.progress["stopped"]:
                        self._checkpoint()
                    if self.progress["stopped"]:
                        break
        except _Stop:
            self._checkpoint()
            raise TrainingInterrupted(
                f"Interrupted {_position(self.progress, self.plan)}; the state is saved in {self.work}"
                f"{unchanged}. Run the same command with --resume to continue."
            ) from None
        except KeyboardInterrupt:  # a second Ctrl-C: the last saved state stands
            raise TrainingInterrupted(
                f"Stopped at once{unchanged}; --resume continues from the last validation's state in {self.work}."
            ) from None
        finally:
            self.lm.eval()
            self.lm.checkpointing = False
        return self._finish()

    def _start(self) -> None:
        """Features, model, optimizer and data order; then the saved state (resume) or a baseline validation."""
        config, accelerator = self.config, self.accelerator
        if accelerator.is_main_process and not config.resume:
            self.folder.start()
        accelerator.wait_for_everyone()
        torch.manual_seed(config.seed)
        self._scan()
        processes = accelerator.num_processes
        self.plan = plan(config, self.task, len(self.dataset.train), processes, self._has_base_adapter())
        self.model = AdapterLoss(self._new_adapter())
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model.adapter, self.task, self.plan, config.weight_decay),
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        self.sampler = EpochSampler(len(self.dataset.train), config.seed)
        loader = DataLoader(
            self.dataset.train,
            batch_size=self.plan.batch_size,
            sampler=self.sampler,
            collate_fn=self._collate,
            generator=torch.Generator(),  # its iterators' seed is not drawn from the RNG dropout uses
        )
        self.model, self.optimizer, self.loader = accelerator.prepare(self.model, self.optimizer, loader)
        self.lm.checkpointing = config.gradient_checkpointing
        if config.resume:
            self._resume()
            return
        self.progress = {
            "epoch": 0,
            "step": 0,  # batches done in the epoch
            "loss_sum": 0.0,  # the epoch's training loss so far
            "samples": 0,
            "seconds": 0.0,
            "baseline": None,
            "best": None,
            "history": [],
            "stale": 0,  # validations without improvement
            "stopped": None,
            "log_bytes": 0,
            "settings": settings(config),
            "plan": self.plan.as_dict(),
        }
        self._write_log({"event": "start", "plan": self.plan.as_dict(), "data": self.dataset.summary()})
        self._log(logging.INFO, "the %s recipe, because %s", self.plan.recipe, self.plan.reason)
        if accelerator.is_main_process:
            baseline = {"event": "baseline", "epoch": 0, **self._validate(self._model())}
            self.progress["baseline"] = baseline
            self._write_log(baseline)
            self._log(logging.INFO, "before training: %s", _scores(baseline))
        self._checkpoint()

    def _resume(self) -> None:
        progress = self.folder.progress()
        now = settings(self.config)
        changed = [name for name in now if now[name] != progress["settings"].get(name)]
        if changed:
            raise ConfigError(
                f"the run in {self.work} was started with other settings ({', '.join(changed)}): "
                "resume it with the same command, or start over with --overwrite"
            )
        if self.plan.as_dict() != progress["plan"]:
            raise ConfigError(
                f"the data differ from those the run in {self.work} started with: resume it with the same data, "
                "or start over with --overwrite"
            )
        self.progress = self.folder.load(self.accelerator)
        self._log(logging.WARNING, "%s", _position(progress, self.plan, resuming=True))

    def _new_adapter(self) -> Adapter:
        torch.manual_seed(self.config.seed)
        adapter = Adapter(
            self.task.injection, self.encoder.dim, self.lm.config.hidden_size, self.lm.config.word_embed_proj_dim
        )
        if self.plan.init_from_base:
            try:
                adapter.load_state_dict(self.pipeline.adapter(self.task).state_dict())
            except WeightsUnavailable as exc:
                raise WeightsUnavailable(
                    f"{exc} Small data starts from the base task's adapter by default; "
                    "--no-init-from-base starts from a fresh one."
                ) from exc
        return adapter.to(self.device)

    def _log(self, level: int, message: str, *args: Any) -> None:
        """Log once, from the main process (every process runs the same code)."""
        if self.accelerator.is_main_process:
            log.log(level, message, *args)

    def _model(self) -> AdapterLoss:
        return self.accelerator.unwrap_model(self.model)

    def _safe_point(self, every_process: bool = True) -> None:
        """Stop here if Ctrl-C asked to. With several processes, only where every process passes (the
        training steps, not the main process's validation), so that they stop at the same step."""
        requested = self.interrupts.requested
        if self.accelerator.num_processes > 1:
            if not every_process:
                return
            flag = torch.tensor([float(requested)], device=self.device)
            requested = bool(self.accelerator.reduce(flag, "max").item())
        if requested:
            raise _Stop

    def _train_epoch(self, epoch: int) -> None:
        """The epoch's remaining steps (all of them, unless it was interrupted)."""
        config, plan, progress = self.config, self.plan, self.progress
        if progress["step"] >= plan.steps_per_epoch:
            return  # trained before an interruption during its validation
        self.sampler.use_epoch(epoch)
        # batches done before an interruption are skipped (collated, not run): the order is the epoch's own
        batches = itertools.islice(self.loader, progress["step"], None)
        self.lm.train(plan.dropout)
        self.model.train()
        bar = tqdm(
            batches,
            total=plan.steps_per_epoch,
            initial=progress["step"],
            desc=f"epoch {epoch + 1}/{plan.epochs}",
            disable=not (config.progress and self.accelerator.is_main_process),
            unit="batch",
        )
        with bar:
            for batch in bar:
                self._step(epoch, batch, bar)

    def _step(self, epoch: int, batch: dict[str, Any], bar: tqdm) -> None:
        """One optimizer step, unless Ctrl-C asked to stop before it."""
        config, plan, progress = self.config, self.plan, self.progress
        self._safe_point()
        started = time.perf_counter()
        set_lr(self.optimizer.param_groups, plan, epoch, progress["step"])
        per_sample = self._loss(self.model, batch)
        loss = per_sample.sum() / len(per_sample) * config.lm_loss_weight
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        progress["step"] += 1
        progress["loss_sum"] += value
        progress["samples"] += len(per_sample)
        progress["seconds"] += time.perf_counter() - started
        rate = progress["samples"] / progress["seconds"]
        bar.set_postfix(loss=f"{value:.4f}", samples_per_s=f"{rate:.1f}")
        step = epoch * plan.steps_per_epoch + progress["step"]  # counted over the whole run
        if step % config.log_every == 0:
            groups = self.optimizer.param_groups
            self._write_log(
                {
                    "event": "step",
                    "epoch": epoch + 1,
                    "step": step,
                    "loss": value,
                    "lr": groups[0]["lr"],
                    "group_lrs": [group["lr"] for group in groups],
                    "samples_per_s": rate,
                }
            )

    def _end_epoch(self, epoch: int) -> None:
        """The epoch's record; the validation and the best adapter when one is due; early stopping."""
        progress, plan = self.progress, self.plan
        record = {
            "event": "epoch",
            "epoch": epoch + 1,
            "train_loss": progress["loss_sum"] / plan.steps_per_epoch,
            "samples_per_s": progress["samples"] / max(progress["seconds"], 1e-9),
        }
        if plan.validates(epoch) and self.accelerator.is_main_process:
            record.update(self._validate(self._model()))
            self._keep_best(record)
        if self.accelerator.num_processes > 1:  # the main process decides, every process stops
            from accelerate.utils import broadcast_object_list

            progress["stopped"] = broadcast_object_list([progress["stopped"]])[0]
        self._write_log(record)
        self._log(logging.INFO if self.metric in record else logging.DEBUG, "epoch %d: %s", epoch + 1, _scores(record))
        progress["history"].append(record)
        progress.update(epoch=epoch + 1, step=0, loss_sum=0.0, samples=0, seconds=0.0)

    def _keep_best(self, record: dict) -> None:
        """Save the adapter when it is the best so far; stop when `patience` validations did not improve."""
        progress, metric = self.progress, self.metric
        best = progress["best"]
        improved = best is None or record[metric] >= best[metric] + MIN_GAIN
        improved = improved or record["validation_loss"] < best["validation_loss"] * (1 - MIN_IMPROVEMENT)
        if best is None or _better(record, best, metric):
            keys = ("epoch", metric, "validation_loss")
            progress["best"] = {key: record[key] for key in keys}
            self._save_best()
        progress["stale"] = 0 if improved else progress["stale"] + 1
        if self.plan.patience and progress["stale"] >= self.plan.patience and record["epoch"] < self.plan.epochs:
            best = progress["best"]
            progress["stopped"] = (
                f"stopped early after epoch {record['epoch']} of {self.plan.epochs}: neither {metric} nor the "
                f"validation loss improved for {progress['stale']} validations (best {metric} {best[metric]:.4f} "
                f"at epoch {best['epoch']})"
            )
            self._log(logging.WARNING, "%s", progress["stopped"])
            self._write_log({"event": "stop", "reason": progress["stopped"]})

    def _checkpoint(self) -> None:
        """Save the state `--resume` continues from: adapter, optimizer, random states, progress."""
        self.folder.save(self.accelerator, self.progress)

    def _finish(self) -> TrainResult:
        accelerator, metric = self.accelerator, self.metric
        accelerator.wait_for_everyone()
        progress = self.folder.progress()  # the main process's, with the validation
        accelerator.wait_for_everyone()  # read by every process before the main one moves the folder
        best, baseline = progress["best"], progress["baseline"]
        improved = best[metric] - baseline[metric] >= MIN_GAIN
        ending = summary(metric, best, baseline, improved, self.plan.init_from_base)
        if accelerator.is_main_process:
            self._write_log({"event": "end", "improved": improved, "summary": ending, "stopped": progress["stopped"]})
            config = AdapterConfig.read(self.work, self.task.id)
            ended = dict(baseline=baseline, summary=ending, stopped=progress["stopped"], finished=True)
            config = replace(config, training={**config.training, **ended})
            config.write(self.work)
            (self.work / "README.md").write_text(self._card(config.to_dict(), progress))
            self.folder.finish()
        accelerator.wait_for_everyone()
        url = self._push() if self.config.push_to_hub and accelerator.is_main_process else None
        return TrainResult(
            self.out,
            metric,
            best[metric],
            best["epoch"],
            baseline[metric],
            improved,
            ending,
            progress["stopped"],
            progress["history"],
            url,
            accelerator.is_main_process,
        )

    # -- output ------------------------------------------------------------------------------

    def _write_log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            self.folder.log(record)

    def _save_best(self) -> None:
        adapter = self._model().adapter
        name = Path(self.dataset.source).name
        config = AdapterConfig(
            # its own title and menu label, not the base task's
            replace(
                self.task, title=f"{self.task.title}, trained on {name}", label=f"{self.task.label}, trained on {name}"
            ),
            base_task=self.task.id,
            tiny=self.pipeline.random_weights,
            training={
                "data": self.dataset.summary(),
                "plan": self.plan.as_dict(),
                "settings": settings(self.config),
                "peak_lrs": {g.get("name", str(i)): g["peak_lr"] for i, g in enumerate(self.optimizer.param_groups)},
                "mixed_precision": self.precision,
                "best": self.progress["best"],
            },
        )
        save_adapter(adapter.state_dict(), config, self._card(config.to_dict(), self.progress), self.work)

    def _card(self, config: dict, progress: dict) -> str:
        parameters = sum(p.numel() for p in self._model().adapter.parameters())
        usage = self.config.push_to_hub or self.out
        return model_card(self.task, config, progress, self.metric, parameters, usage)

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


def _better(record: dict, best: dict, metric: str) -> bool:
    """A higher metric, or the same (within `MIN_GAIN`) with a lower validation loss: small validation
    sets tie often, and a CIDEr of 0.0000026 is no better than 0."""
    gain = record[metric] - best[metric]
    return gain >= MIN_GAIN or (abs(gain) < MIN_GAIN and record["validation_loss"] < best["validation_loss"])


def _scores(record: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k not in TIMING)


def _position(progress: dict, plan: Plan, resuming: bool = False) -> str:
    """Where a run stopped, or what it resumes with, counted from 1 as the progress bars count:
    "in epoch 3 of 8, after step 22 of 40" / "resuming epoch 3 of 8 at step 23 of 40"."""
    epoch, step, of = progress["epoch"] + 1, progress["step"], f"of {plan.epochs}"
    if step >= plan.steps_per_epoch:
        return (
            f"resuming with the validation of epoch {epoch} {of}"
            if resuming
            else f"while validating epoch {epoch} {of}"
        )
    if step == 0:
        return f"{'resuming at' if resuming else 'at'} the start of epoch {epoch} {of}"
    if resuming:
        return f"resuming epoch {epoch} {of} at step {step + 1} of {plan.steps_per_epoch}"
    return f"in epoch {epoch} {of}, after step {step} of {plan.steps_per_epoch}"


def _finished_result(out: Path, config: dict) -> TrainResult:
    training = config["training"]
    metric = next(k for k in training["best"] if k not in ("epoch", "validation_loss"))
    best, baseline = training["best"], training["baseline"]
    return TrainResult(
        out,
        metric,
        best[metric],
        best["epoch"],
        baseline[metric],
        best[metric] - baseline[metric] >= MIN_GAIN,
        training["summary"],
        training["stopped"],
        already_finished=True,
    )


def train(
    data: str | Path,
    base: str,
    out: str | Path,
    config: TrainConfig | None = None,
    pipeline: Any = None,
    **options: Any,
) -> TrainResult:
    """Train an adapter for the base task `base` on `data` (a folder, or a Hub dataset id); write it to `out`.

        from epalm import train
        train("my-photos/", base="image-caption", out="my-adapter")

    `options` are `TrainConfig` fields; `pipeline` shares already-loaded models (its device and
    dtype are then used)."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown training options: {', '.join(unknown)}")
    config = replace(config or TrainConfig(), **options)
    return Trainer(data, base, out, config, pipeline).run()


__all__ = ["DataError", "TrainConfig", "TrainResult", "Trainer", "TrainingInterrupted", "train"]
