"""Live progress on stderr: one redrawn status line on a terminal, periodic lines otherwise."""
from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_num(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:g}" if isinstance(x, float) else str(x)


class Progress:
    def __init__(self, total_stages: int, stream: TextIO | None = None,
                 interval: float = 10.0, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.total = total_stages
        self.index = 0
        self.interval = interval
        self._stage = ""
        self._started = 0.0
        self._last_print = 0.0
        self._lock = threading.Lock()

    def _write(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[2K" + text + ("\n" if final else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def stage_started(self, stage: str, component: str) -> None:
        self.index += 1
        self._stage, self._started = stage, time.monotonic()
        self._last_print = 0.0
        self._write(f"[{self.index}/{self.total}] {stage} ({component}) running", final=not self.tty)

    def update(self, stage: str, done: float, total: float | None, unit: str) -> None:
        now = time.monotonic()
        if not self.tty and now - self._last_print < self.interval:
            return
        self._last_print = now
        elapsed = now - self._started
        if total:
            frac = min(max(done / total, 0.0), 1.0)
            bar = "#" * int(frac * 24) + "-" * (24 - int(frac * 24))
            eta = elapsed / frac - elapsed if frac > 0 else 0.0
            text = (f"[{self.index}/{self.total}] {stage} [{bar}] {_fmt_num(done)}/{_fmt_num(total)}"
                    f" {unit} {_fmt_seconds(elapsed)} (eta {_fmt_seconds(eta)})")
        else:
            text = f"[{self.index}/{self.total}] {stage} {_fmt_num(done)} {unit} {_fmt_seconds(elapsed)}"
        self._write(text)

    def stage_finished(self, stage: str, status: str, seconds: float, summary: str = "") -> None:
        if status == "cached":
            self.index += 1
        tail = f"  {summary}" if summary else ""
        self._write(f"[{self.index}/{self.total}] {stage} {status} {seconds:.1f}s{tail}", final=True)

    def stage_failed(self, stage: str, error: BaseException) -> None:
        self._write(f"[{self.index}/{self.total}] {stage} FAILED: {type(error).__name__}: {error}",
                    final=True)

    def log(self, message: str) -> None:
        self._write(message, final=True)
