"""Where a training run writes: `OUT.training/` while it runs, `OUT/` once it finishes.

An interrupted run leaves `OUT` as it was (the adapter of an earlier run stays whole and usable)
and its own state in `OUT.training/last/`, which `--resume` continues from. A checkpoint is written
next to the last one and then replaces it, so a save cut short leaves the last one whole; the
log's length at each checkpoint is kept with it, so that lines written after it are written again,
once, by the resumed run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .recipe import ConfigError
from .refs import ADAPTER_CONFIG

LAST = "last"  # the state --resume continues from
PROGRESS = "progress.json"
LOG_FILE = "log.jsonl"


class RunFolder:
    """The output folder `out` of a run and the folder `work` it runs in."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out).expanduser().resolve()
        self.work = self.out.with_name(self.out.name + ".training")
        self.last = self.work / LAST

    @property
    def resumable(self) -> bool:
        return (self.last / PROGRESS).is_file()

    def check(self, resume: bool, overwrite: bool) -> dict | None:
        """Refuse an output folder a run would overwrite or cannot continue; with `resume`, return the
        adapter config of a run that already finished there (nothing is left to do)."""
        out, work = self.out, self.work
        if resume:
            if self.resumable:
                return None
            finished = self.finished_config()
            if finished is not None:
                return finished
            raise ConfigError(f"nothing to resume: {work} holds no interrupted run (and {out} no finished one)")
        if self.resumable and not overwrite:
            raise ConfigError(
                f"{work} holds an interrupted run: continue it with --resume, or start over with --overwrite"
            )
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder")
        if out.is_dir() and any(out.iterdir()):
            if not (out / ADAPTER_CONFIG).is_file():
                raise ConfigError(
                    f"{out} is not empty and holds no adapter: choose another --out (nothing is replaced)"
                )
            if not overwrite:
                raise ConfigError(
                    f"{out} already holds an adapter: --overwrite replaces it when the new run finishes (until then "
                    "it stays as it is), --resume continues an interrupted run"
                )
        return None

    def finished_config(self) -> dict | None:
        """The adapter config of a finished training run in `out`, if there is one."""
        try:
            config = json.loads((self.out / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError):
            return None
        return config if config.get("training", {}).get("finished") else None

    def start(self) -> None:
        """A fresh run folder (a stale one, of a run that saved nothing or that --overwrite replaces, goes)."""
        self.discard()
        self.work.mkdir(parents=True)

    def discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def log(self, record: dict) -> None:
        with (self.work / LOG_FILE).open("a") as log_file:
            log_file.write(json.dumps(record) + "\n")

    def log_size(self) -> int:
        log_file = self.work / LOG_FILE
        return log_file.stat().st_size if log_file.is_file() else 0

    def progress(self) -> dict:
        """The progress saved with the last checkpoint."""
        return json.loads((self.last / PROGRESS).read_text())

    def save(self, accelerator: Any, progress: dict) -> None:
        """A checkpoint: accelerate's state (adapter, optimizer, random states) and `progress`, which
        records the log's length. Every process calls it; the main process writes the files it alone holds."""
        partial, old = self.last.with_name(LAST + ".partial"), self.last.with_name(LAST + ".old")
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            progress["log_bytes"] = self.log_size()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / PROGRESS).write_text(json.dumps(progress, indent=1))
            if self.last.exists():
                self.last.rename(old)
            partial.rename(self.last)
            shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def load(self, accelerator: Any) -> dict:
        """The last checkpoint's state restored; its progress; the log cut back to where it was then."""
        accelerator.load_state(str(self.last))
        progress = self.progress()
        if accelerator.is_main_process:
            with (self.work / LOG_FILE).open("r+b") as log_file:
                log_file.truncate(progress["log_bytes"])
        return progress

    def finish(self) -> None:
        """The finished run's folder becomes `out`; the adapter it replaces is deleted only then."""
        old = None
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".replaced")
            shutil.rmtree(old, ignore_errors=True)
            self.out.rename(old)
        self.work.rename(self.out)
        if old is not None:
            shutil.rmtree(old)
        shutil.rmtree(self.out / LAST, ignore_errors=True)  # nothing to resume in a finished run
