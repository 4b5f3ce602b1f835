"""Progress of a training run: a one-line bar on a terminal, plain lines every `every` steps otherwise, with
the time left at the run's current pace."""

from __future__ import annotations

import sys
import time


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """prefix: put before every step line (`miras compare` names the run); details: also print the run's
    header and evaluation lines (`line`)."""

    def __init__(self, total: int, every: int, quiet: bool, prefix: str = "", details: bool = True):
        self.total, self.every, self.quiet, self.prefix, self.details = total, every, quiet, prefix, details
        self.tty = sys.stdout.isatty()
        self.start_step, self.start_time = 0, time.perf_counter()

    def start(self, step: int) -> None:
        """The pace is measured from here (after the first evaluation; a resumed run from its step)."""
        self.start_step, self.start_time = step, time.perf_counter()

    def update(self, step: int, loss: float, lr: float, tps: float) -> None:
        if self.quiet:
            return
        done = step - self.start_step
        left = (time.perf_counter() - self.start_time) / max(done, 1) * (self.total - step)
        msg = (f"{self.prefix}step {step:>5}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s  "
               f"ETA {duration(left)}")
        if self.tty:
            bar = int(20 * step / self.total)
            print(f"\r\033[K[{'#' * bar}{'.' * (20 - bar)}] {msg}", end="", flush=True)
            if step == self.total:
                print()
        elif step % self.every == 0 or step == self.total:
            print(msg, flush=True)

    def line(self, msg: str, always: bool = False) -> None:
        """Print msg on its own line (clearing the bar); a detail unless `always`."""
        if self.quiet or not (self.details or always):
            return
        if self.tty:
            print("\r\033[K", end="")
        print(msg, flush=True)
