"""What several benchmarks share: peak RSS of processes that are not our children (Ray's workers)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator


class PeakRSS:
    """Context manager: a thread that samples VmHWM of every process whose /proc cmdline contains `needle`,
    leaving out those already running on entry (a finished dataset's actors linger for a while)."""

    def __init__(self, needle: str = "ImageDownloader", period_s: float = 0.2) -> None:
        self.needle, self.period_s, self.peak_kib = needle.encode(), period_s, {}  # pid -> max VmHWM seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._old = dict(self._scan())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _scan(self) -> Iterator[tuple[str, int]]:
        """Yields (pid, VmHWM KiB) of the matching processes."""
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:  # the process may exit between the listing and the reads
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if self.needle not in f.read():
                        continue
                with open(f"/proc/{pid}/status") as f:
                    yield pid, next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                continue

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for pid, kib in self._scan():
                if pid not in self._old:
                    self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), kib)

    def result(self) -> dict:
        """The max over sampled processes, in MiB (absent if none was seen), and how many there were."""
        if not self.peak_kib:
            return {"rss_pids": 0}
        return {"peak_rss_mib": max(self.peak_kib.values()) / 1024, "rss_pids": len(self.peak_kib)}
