"""Live progress on stderr: a tqdm bar per running stage on a terminal, periodic plain lines
otherwise (CI logs, files); and the ``logging`` handler that prints log records without
breaking the bar.

Stages report progress through ``StageContext.progress`` and log through
``StageContext.log`` (the ``recipe_engine.stage.<name>`` logger); the CLI installs
``Progress.handler()`` on the ``recipe_engine`` logger.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

from .redact import redact_text


def _fmt_num(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:g}" if isinstance(x, float) else str(x)


class Progress:
    def __init__(self, total_stages: int, stream: TextIO | None = None,
                 interval: float = 10.0, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total = total_stages
        self.index = 0
        self.interval = interval
        self._bar: Any = None
        self._started = 0.0
        self._last_print = 0.0
        self._lock = threading.Lock()

    # -- output ------------------------------------------------------------------------

    def _line(self, text: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._bar is not None:
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- events from the runner ----------------------------------------------------------

    def stage_started(self, stage: str, component: str) -> None:
        self.index += 1
        self._started = time.monotonic()
        self._last_print = 0.0
        label = f"[{self.index}/{self.total}] {stage}"
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(desc=label, file=self.stream, leave=False, dynamic_ncols=True,
                             unit_scale=True, mininterval=0.5)
        else:
            self._line(f"{label} ({component}) running")

    def update(self, stage: str, done: float, total: float | None, unit: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            with self._lock:
                if total and self._bar.total != total:
                    self._bar.total = total
                self._bar.unit = unit or "it"
                self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last_print < self.interval:
            return
        self._last_print = now
        elapsed = now - self._started
        of = f"/{_fmt_num(total)}" if total else ""
        self._line(f"[{self.index}/{self.total}] {stage} {_fmt_num(done)}{of} {unit} "
                   f"{elapsed:.0f}s")

    def stage_finished(self, stage: str, status: str, seconds: float, summary: str = "") -> None:
        self._close_bar()
        if status == "cached":
            self.index += 1
        tail = f"  {summary}" if summary else ""
        self._line(f"[{self.index}/{self.total}] {stage} {status} {seconds:.1f}s{tail}")

    def stage_failed(self, stage: str, error: BaseException) -> None:
        self._close_bar()
        self._line(f"[{self.index}/{self.total}] {stage} FAILED: {type(error).__name__}: {error}")

    def log(self, message: str) -> None:
        self._line(message)

    def handler(self, level: int = logging.INFO) -> logging.Handler:
        """A logging handler printing ``[stage] message`` lines through this display."""
        return _ProgressHandler(self, level)


class _ProgressHandler(logging.Handler):
    def __init__(self, progress: Progress, level: int):
        super().__init__(level)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            name = record.name
            stage_prefix = "recipe_engine.stage."
            where = name[len(stage_prefix):] if name.startswith(stage_prefix) else ""
            prefix = f"[{where}] " if where else ""
            if record.levelno >= logging.WARNING:
                prefix += f"{record.levelname.lower()}: "
            line = redact_text(prefix + record.getMessage())
            if self.progress.enabled:
                self.progress.log(line)
            elif record.levelno >= logging.WARNING:  # --quiet hides progress, not warnings
                self.progress.stream.write(line + "\n")
                self.progress.stream.flush()
        except Exception:
            self.handleError(record)
