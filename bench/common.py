"""What several benchmarks share: peak RSS of processes that are not our children (Ray's workers)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator


class PeakRSS:
    """Context manager: a thread that samples, every `period_s`, the memory of every process whose /proc cmdline
    contains `needle`, leaving out those already running on entry when `new_only` (a finished dataset's actors
    linger a while; but Ray's idle workers, started with it, run the next tasks).

    Two figures per process: VmHWM, the kernel's peak RSS, which also counts the pages of Ray's shared object store
    that the process touched (a worker reading a block maps it); and the largest RssAnon sampled, its private
    memory, with the process title at that moment (Ray retitles a worker with the task it runs)."""

    def __init__(self, needle: str = "ImageDownloader", period_s: float = 0.2, new_only: bool = True) -> None:
        self.needle, self.period_s, self.new_only = needle.encode(), period_s, new_only
        self.peak_kib: dict[str, int] = {}  # pid -> max VmHWM seen
        self.anon_kib: dict[str, tuple[int, str]] = {}  # pid -> (max RssAnon sampled, title then)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._old = {pid for pid, *_ in self._scan()} if self.new_only else set()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _scan(self) -> Iterator[tuple[str, int, int, str]]:
        """Yields (pid, VmHWM KiB, RssAnon KiB, title) of the matching processes."""
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:  # the process may exit between the listing and the reads
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
                if self.needle not in cmdline:
                    continue
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if line.startswith(("VmHWM:", "RssAnon:")))
                title = cmdline.split(b"\0")[0].decode(errors="replace")[:80]
                yield pid, int(fields["VmHWM"].split()[0]), int(fields["RssAnon"].split()[0]), title
            except (OSError, KeyError, ValueError):
                continue

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for pid, hwm, anon, title in self._scan():
                if pid not in self._old:
                    self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), hwm)
                    if anon > self.anon_kib.get(pid, (0, ""))[0]:
                        self.anon_kib[pid] = (anon, title)

    def result(self) -> dict:
        """The max over sampled processes, in MiB (absent if none was seen), and how many there were."""
        if not self.peak_kib:
            return {"rss_pids": 0}
        anon, title = max(self.anon_kib.values(), default=(0, ""))
        return {
            "peak_rss_mib": max(self.peak_kib.values()) / 1024,
            "peak_private_mib": anon / 1024,
            "peak_private_in": title,
            "rss_pids": len(self.peak_kib),
        }
