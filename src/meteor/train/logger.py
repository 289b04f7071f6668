"""Run logs: one JSON line per logged step (log.jsonl), TensorBoard when installed, and progress on
the terminal: a bar, or a line every tenth of the run (readable when several runs share a terminal
or the output goes to a file)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class _Progress:
    def __init__(self, total: int, initial: int, style: str, label: str):
        self._bar = None
        self.total, self.done, self.label = total, initial, label
        self._lines = style == "lines"
        self._started, self._first = time.perf_counter(), initial
        if style == "bar":
            try:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                                 mininterval=1.0, file=sys.stderr)
            except ImportError:
                self._lines = True

    def update(self, steps: int, loss: float | None) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        before, self.done = self.done, self.done + steps
        tenth = max(1, self.total // 10)
        if self._lines and (self.done // tenth > before // tenth or self.done == self.total):
            elapsed = time.perf_counter() - self._started
            rate = (self.done - self._first) / max(elapsed, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            loss_text = "" if loss is None else f", loss {loss:.4f}"
            print(f"    {self.label}: step {self.done}/{self.total}{loss_text}, {rate:.2f} step/s, "
                  f"{left:.0f} s left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class RunLogger:
    """Only the main process writes. On resume, entries after the resumed step (written by a run
    that died before checkpointing them) are dropped, so the log has each step once."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = output_dir / "log.jsonl"
        self._tensorboard = None
        self._started = time.time()
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.is_file():
            # A new run in a folder with an old log: keep the old one instead of mixing both.
            self.path.rename(self.path.with_name(f"log.{int(self._started)}.jsonl"))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            self._tensorboard = None

    def step(self, step: int, values: dict[str, Any], every: int = 1) -> None:
        if not self.enabled or (step % every and step != 1):
            return
        entry = {"step": step, **values, "elapsed_s": round(time.time() - self._started, 3)}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"train/{key}", value, step)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def progress(self, total: int, initial: int, style: str = "bar", label: str = "") -> _Progress:
        """Progress on stderr (main process only): ``style`` "bar", "lines" or "none"."""
        return _Progress(total, initial, style if self.enabled else "none", label or self.path.parent.name)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
