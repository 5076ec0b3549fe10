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


def on_one_actor(cls, cfg, rows: list[dict], out: str, batch: int, unit: str, num_gpus: float = 0) -> None:
    """A model stage as the pipeline runs it: one actor of a Ray Data actor pool (the model loaded once, in the
    actor) over `rows`; prints `unit`/s of its `out` column, model load included, and the worker's peak memory."""
    import time

    import ray
    from ray.data import ActorPoolStrategy

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // batch))
    ds = ds.map_batches(
        cls, fn_constructor_kwargs={"cfg": cfg}, compute=ActorPoolStrategy(size=1), batch_size=batch,
        num_cpus=0.5, num_gpus=num_gpus, zero_copy_batch=False,
    )  # fmt: skip
    with PeakRSS(cls.__name__) as rss:
        t0 = time.perf_counter()
        n = sum(len(b[out]) for b in ds.iter_batches(batch_size=None))
        wall = time.perf_counter() - t0
    r, rate = rss.result(), n / wall
    print(
        f"on a Ray Data actor pool (1 actor, model load included): {rate:,.{0 if rate >= 10 else 3}f} {unit}/s; "
        f"worker peak RSS "
        f"{r.get('peak_rss_mib', float('nan')):,.0f} MiB (private {r.get('peak_private_mib', float('nan')):,.0f} MiB)"
    )
    ray.shutdown()
