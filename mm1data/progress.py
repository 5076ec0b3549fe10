"""What a person sees while a job runs: quiet logs by default, progress of long steps, a summary line per stage."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("mm1data.progress")

VERBOSE = False  # set by configure(): Ray's own logs and progress blocks are shown only when True
LOG_EVERY_S = 15.0  # without a terminal: a progress line this often (and one at the end)
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


def configure(verbose: bool = False) -> None:
    """Logging for the CLI: mm1data's INFO lines; Ray's own INFO lines, progress blocks and backend messages only
    with --verbose (Ray's errors still surface as exceptions naming the failed task)."""
    global VERBOSE
    VERBOSE = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("mm1data").setLevel(logging.INFO)  # libraries logging INFO to the root (open_clip) only verbose
    if not verbose:
        # read by ray.init when it starts the local instance: its C++ core worker would otherwise print every
        # error-level line to the terminal (e.g. the actor-constructor note Ray Data's actor pools trigger)
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    quiet_ray_loggers()


class _DropNotes(logging.Filter):
    """Ray notes that only say what mm1data chose (its own progress instead of Ray Data's blocks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


def quiet_ray_loggers() -> None:
    """Ray's Python loggers: everything with --verbose; else Ray Data's warnings (resources, memory) and errors."""
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if VERBOSE else logging.WARNING)
    if not VERBOSE:
        logging.getLogger("ray").setLevel(logging.ERROR)  # start-up notes (token auth, where the session logs are)
        notes = logging.getLogger("ray.data._internal.progress")  # a filter acts where the record is made
        if not any(isinstance(f, _DropNotes) for f in notes.filters):
            notes.addFilter(_DropNotes())


def quiet_ray() -> None:
    """Ray's Python loggers at WARNING and Ray Data's per-operator progress blocks off unless verbose; called after
    ray.init, which sets up Ray's loggers itself."""
    from ray.data import DataContext

    quiet_ray_loggers()
    ctx = DataContext.get_current()
    # Ray Data's blocks count blocks per operator, not rows, with no ETA: mm1data's own Progress counts rows
    ctx.enable_progress_bars = VERBOSE
    ctx.enable_operator_progress_bars = VERBOSE
    ctx.print_on_execution_start = VERBOSE


class Progress:
    """Work done of a total, with rate and ETA: a tqdm bar on a terminal, else a log line every LOG_EVERY_S and
    one at the end (batch logs stay readable). total None: count and rate only."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "rows") -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.n = 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            scale = unit == "rows"  # 1.5M rows; but 13 shards, not 13.0
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= LOG_EVERY_S:
            self.last = time.monotonic()
            log.info(self.line())

    def line(self) -> str:
        """`desc: 1,200/5,000 rows (24%) in 0:04, 310 rows/s, ETA 0:12` (count and rate only without a total)."""
        elapsed = time.monotonic() - self.t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self.n:,}/{self.total:,} {self.unit} ({self.n / self.total:.0%})" if self.total else f"{self.n:,} "
        if not self.total:
            done += self.unit
        text = f"{self.desc}: {done} in {clock(elapsed)}, {rate:,.1f} {self.unit}/s"
        if self.total and rate > 0 and self.n < self.total:
            text += f", ETA {clock((self.total - self.n) / rate)}"
        return text

    def close(self) -> float:
        """Ends the bar (or logs the final line); returns the seconds taken."""
        if self.bar is not None:
            self.bar.close()
        else:
            log.info(self.line())
        return time.monotonic() - self.t0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass(frozen=True)
class StageSummary:
    """One line per stage at the end of a run: rows in and out, time, throughput."""

    stage: str
    rows_in: int
    rows_out: int
    seconds: float
    out_label: str = "kept"  # what rows_out counts
    note: str = ""

    def line(self) -> str:
        rate = f"{self.rows_in / self.seconds:,.0f} rows/s" if self.seconds > 0 else "-"
        text = (
            f"{self.stage:<14} {self.rows_in:>11,} in  {self.rows_out:>11,} {self.out_label:<7}"
            f" {self.seconds:>8.1f} s  {rate}"
        )
        return text + (f"  ({self.note})" if self.note else "")
