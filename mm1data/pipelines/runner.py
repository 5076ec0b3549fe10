"""One runner for every corpus kind. A kind declares only what is its own (its config, staged columns, reader, per-row
stages with their resources, sample builder, dedup steps); the runner owns the rest: the filter chain, planning, the
fingerprint, resume, the per-row half on Ray Data, the corpus-wide half (split.py), warnings, the funnel, index.json.

    read -> [stages placed "before"] -> filters -> [stages placed "score" (+ the filters on their columns)]
         -> [stages placed "after"] -> staging            ... then split.finalize: dedup -> shards -> meta -> index
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from mm1data import storage
from mm1data.config import ConfigError, check, to_dict
from mm1data.filters import FilterConfig, apply_chain, parse_chain
from mm1data.lease import OutputLease
from mm1data.progress import Progress, StageSummary
from mm1data.read import Unit, plan_units, units_digest
from mm1data.registry import get_filter
from mm1data.shards import check_corpus_name
from mm1data.split import SampleBuilder, ShardConfig, finalize
from mm1data.stage import Batch
from mm1data.staging import check_run, mark_staged, pending_units, read_pending, unit_specs, write_staging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    """How far a run's actor pools may grow. Ray Data adds actors up to these bounds while work queues and the
    cluster has room, so workers the autoscaler adds (or nodes that join) mid-run get work."""

    max_cpus: int | None = None  # CPUs the cluster can grow to; null: the autoscaler's bound, else those now
    max_gpus: int | None = None  # GPUs likewise; > 0: a model stage with num_gpus null asks for a GPU per actor

    def __post_init__(self) -> None:
        check(self, "max_cpus", ge=1, optional=True)
        check(self, "max_gpus", ge=0, optional=True)


@dataclass(frozen=True)
class Capacity:
    """The cluster a run's stages are sized for: CPUs at the start, and the most CPUs and GPUs it can grow to."""

    cpus: int = 1
    max_cpus: int = 1
    max_gpus: float = 0.0


@dataclass(frozen=True)
class RunConfig:
    """What every corpus job has; a kind's Config extends it with its own sections (input, download, clip, ...)."""

    pipeline: str = ""  # the corpus kind (caption | text)
    corpus: str = ""  # shard name prefix: {corpus}-000000.tar (letters, digits, _ . -; no path)
    output: str = ""  # corpus root, local or s3:// (the --output flag sets it)
    filters: str | tuple[dict, ...] = ()  # a chain file (path or preset name in filters/) or an inline list
    shards: ShardConfig = field(default_factory=ShardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # actor pool bounds (the run's resources)

    def __post_init__(self) -> None:
        check_corpus_name(self.corpus)  # a `/` or `..` would put shards outside the output folder


@dataclass(frozen=True)
class Stage:
    """A per-row stage: a map_batches callable and the resources it asks for. A function runs as Ray tasks
    (fn(batch, cfg=cfg)); a class runs on an actor pool of `actors` (min, max) actors (cls(cfg=cfg) once per actor,
    so models load there)."""

    fn: Callable[..., Batch] | type
    cfg: Any
    place: Literal["before", "score", "after"]  # before the filters | thresholded by filters | after every filter
    batch_size: int = 256
    num_cpus: float = 1.0
    num_gpus: float | None = None
    actors: tuple[int, int] | None = None  # actor pool size (min, max) for a class
    provides: tuple[str, ...] = ()  # columns filters may need (e.g. clip_score)


@dataclass(frozen=True)
class Kind:
    """A corpus kind, as a declaration the runner executes."""

    name: str
    config: type  # a RunConfig subclass
    columns: dict[str, pa.DataType]  # staged columns besides key/src_file/src_row/drop_reason/extra; str/bytes/lists
    payload: tuple[str, ...]  # the tar members' columns: never read by the corpus-wide half
    size_col: str  # bytes of a row's payload, for cutting shards by size (the payload's length if no stage sets it)
    read: Callable[[Unit, Any, Iterable[int]], Iterator[Batch]]  # (unit, cfg.input, staged src_rows) -> batches
    stages: Callable[[Any, Capacity], list[Stage]]  # (cfg, the cluster's capacity) -> the per-row stages
    sample: SampleBuilder  # a staged row -> tar members and text tokens
    dedup: Callable[[Any], list]  # cfg -> ExactDedup / NearDedup steps, in order
    fingerprint: Callable[[Any], dict[str, Any]]  # the per-row config sections that staged rows depend on
    batch_size: Callable[[Any], int]  # rows per filter and staging batch
    read_cpus: float = 0.25  # per reading task (WARC HTML extraction is CPU work; jsonl/parquet mostly I/O)
    filter_cpus: float = 0.25
    funnel: Callable[[pa.Table], dict[str, int]] = lambda t: {}  # kind counts for the funnel (e.g. downloaded)
    enables: dict[str, str] = field(default_factory=dict)  # a scorer column -> the setting that computes it
    warnings: Callable[[Any], list[str]] = lambda cfg: []
    # a unit's rows after the dedup marks are applied -> the same rows with the kind's own part of the marks applied
    # (e.g. images removed from their documents); None: nothing to do
    decided: Callable[[pa.Table], pa.Table] | None = None
    decided_columns: tuple[str, ...] = ()  # the staged columns `decided` changes: shards take them from its rows
    # a meta part's rows -> the score store's item rows (e.g. one per image), written to meta_{items}/; None: none
    items: tuple[str, Callable[[pa.Table], pa.Table]] | None = None
    # a raw run config (YAML + --set, or an index.json's) in an older form -> today's form; before validation
    upgrade: Callable[[dict[str, Any]], dict[str, Any]] = lambda raw: raw


def cluster_capacity(cfg: RunConfig) -> Capacity:
    """The connected cluster's CPUs now, and the most CPUs and GPUs it can reach: `cluster.max_cpus` /
    `cluster.max_gpus` when set, else the autoscaler's bounds (the node types of `ray up`'s config, summed at their
    max_workers), else what it has now."""
    import ray

    now = ray.cluster_resources()
    try:  # Ray's own reading of the autoscaler config (what Ray Data's autoscaler uses); None without an autoscaler
        bound = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:  # a private API: if it moves, the pools are sized from the cluster as it is now
        log.debug("no autoscaler bounds", exc_info=True)
        bound = {}
    cpus = max(1, int(now.get("CPU", 0)))
    c = cfg.cluster
    max_cpus = c.max_cpus if c.max_cpus is not None else max(int(bound.get("CPU", 0)), int(now.get("CPU", 0)))
    max_gpus = c.max_gpus if c.max_gpus is not None else max(float(bound.get("GPU", 0)), float(now.get("GPU", 0)))
    return Capacity(cpus=cpus, max_cpus=max(cpus, max_cpus), max_gpus=float(max_gpus))


def model_gpus(c: Any, cap: Capacity) -> float | None:
    """GPUs per actor of a model stage (CLIP, relevance, recaption): its `num_gpus` when set (0: none), else 1 when
    the cluster has or can get GPUs (so an autoscaler with GPU workers at 0 is asked for one), else none."""
    if c.num_gpus is not None:
        return c.num_gpus or None
    return 1.0 if cap.max_gpus > 0 else None


def null_weights(section: str, c: Any, output: str) -> list[str]:
    """The run's warning (index.json) when a model stage runs with random weights (`pretrained: null`)."""
    if c.enabled and c.pretrained is None:
        return [f"{section}.pretrained is null: {c.model} ran with random weights; {output} is noise"]
    return []


def min_workers(c: Any) -> int:
    """A model stage's fewest actors: `workers` as N or as [min, max]."""
    return c.workers[0] if isinstance(c.workers, tuple) else c.workers


def model_cpus(c: Any, cap: Capacity) -> float:
    """CPUs a model stage's actors hold while the run lasts (at their minimum): a CPU-only actor is counted at 0.5
    (0 if disabled)."""
    return (1.0 if model_gpus(c, cap) else 0.5) * min_workers(c) if c.enabled else 0.0


def model_pool(c: Any, cap: Capacity) -> tuple[int, int]:
    """A model stage's actor pool (min, max). `workers: N`: N at least; on GPUs as many as the GPUs the cluster can
    reach hold, on CPU N (each actor holds a model copy and its CPU share while idle, and CPU scoring is the
    small-machine fallback). `workers: [min, max]`: as given, the maximum cut to what the GPUs can hold on GPUs."""
    gpus = model_gpus(c, cap)
    low = min_workers(c)
    high = c.workers[1] if isinstance(c.workers, tuple) else None
    if not gpus:
        return low, high or low
    if 0 < cap.max_gpus < low * gpus:  # its minimum could never start: the run would wait forever
        raise ConfigError(
            f"{low} model actors at {gpus:g} GPU each need {low * gpus:g} GPUs; the cluster can reach "
            f"{cap.max_gpus:g} (lower `workers` or `num_gpus`, or set cluster.max_gpus)"
        )
    if cap.max_gpus <= 0:  # none known (num_gpus set on a cluster that has no GPU yet): as configured
        return low, high or low
    reach = int(cap.max_gpus / gpus)
    return low, max(low, min(high, reach) if high else reach)


def model_stage(
    cls: type, c: Any, place: str, batch_size: int, cap: Capacity, provides: tuple[str, ...] = ()
) -> Stage:
    """A model (open_clip weights: `c.model`, `c.pretrained`, `c.model_config`) on an elastic actor pool
    (model_pool), a GPU each when model_gpus says so; local weight paths made absolute (actors may run elsewhere)."""
    gpus = model_gpus(c, cap)
    pool = model_pool(c, cap)
    c = dataclasses.replace(c, pretrained=absolute(c.pretrained), model_config=absolute(c.model_config))
    return Stage(
        cls,
        c,
        place,
        batch_size=batch_size,
        num_cpus=1.0 if gpus else 0.5,
        num_gpus=gpus,
        actors=pool,
        provides=provides,
    )


def download_pool(workers: int, models: Iterable[Any], cap: Capacity) -> tuple[float, tuple[int, int]]:
    """CPUs per actor and the (min, max) actor pool of a download stage run beside the model stages `models`:
    `workers` actors when set, else one per CPU the cluster has at the start (min) and can grow to (max), less the
    model actors. Actors hold their CPU share while idle, so one CPU is left for the tasks (read, repartition,
    filters, staging), or the pipeline starves on a small machine (2 CPUs: one download actor at 0.5 CPU beside a
    CPU-only CLIP actor at 0.5)."""
    models = [c for c in models if c.enabled]
    taken = sum(min_workers(c) for c in models)
    low = workers or max(1, cap.cpus - taken)
    high = workers or max(low, cap.max_cpus - taken)
    held = sum(model_cpus(c, cap) for c in models)
    return min(0.5, max(0.05, (cap.max_cpus - 1 - held) / high)), (low, high)


def absolute(path: str | None) -> str | None:
    """A local path made absolute (Ray workers may run elsewhere); s3:// URIs and names stay as they are."""
    if not path or storage.is_s3(path) or "://" in path or os.path.isabs(path):
        return path
    return os.path.abspath(path)


def init_ray(address: str | None) -> None:
    """A local Ray of our own unless an address is given (`auto`, `ray://...`); reuses one this process started.
    A bare ray.init() would join any cluster running on the machine, whose workers have another working dir."""
    import ray

    from mm1data import progress

    if not ray.is_initialized():
        quiet = not progress.VERBOSE
        ray.init(
            address=address or "local",
            log_to_driver=not quiet,  # workers' own lines (per-row failures are data, in meta and the funnel)
            include_dashboard=False,
            logging_level=logging.ERROR if quiet else logging.INFO,
        )
    progress.quiet_ray()


def unscored(kind: Kind, cfg: Any, chain: Iterable[FilterConfig]) -> Iterator[tuple[str, list[str], str]]:
    """The chain's filters that need a scorer column no stage of this config computes: (filter, the missing columns,
    which settings would compute them)."""
    provided = {c for s in kind.stages(cfg, Capacity()) for c in s.provides}
    for c in chain:
        missing = sorted(set(get_filter(c.name).needs) - provided)
        if missing:
            yield c.name, missing, "; ".join(f"{m} needs {kind.enables[m]}" for m in missing if m in kind.enables)


def run(kind: Kind, cfg: Any, search_dirs: tuple[str, ...] = (), address: str | None = None) -> dict[str, Any]:
    """Run (or finish, after a crash) a corpus job; returns the index.json it wrote."""
    chain = parse_chain(cfg.filters, search_dirs)
    for name, missing, how in unscored(kind, cfg, chain):
        raise ConfigError(f"filter {name} needs {', '.join(missing)}, not computed with this config ({how})")
    kind.dedup(cfg)  # builds (and checks: dedup.reference) the dedup steps now, so a bad one fails before Ray starts
    units = plan_units(cfg.input)
    fingerprint = {
        "input": to_dict(cfg.input),
        "units": units_digest(units),
        "filters": [c.per_row() for c in chain],  # not the percentiles: a new one redoes only the corpus-wide half
        **kind.fingerprint(cfg),
    }
    lease = OutputLease(cfg.output)
    with lease:
        try:
            run_id = check_run(cfg.output, fingerprint, cfg.corpus)
        except ConfigError:
            lease.release_unused()
            raise
        init_ray(address)
        per_row = stage_rows(kind, cfg, chain, units)
        lease.check()
        stages = [per_row] if per_row else []
        resolved = dataclasses.replace(cfg, filters=tuple(to_dict(chain)))  # the chain inline, as it ran
        index = finalize(kind, resolved, units, run_id, kind.warnings(cfg), lease.check, stages=stages)
    log.info("stage summary (rows in, rows out, wall time, throughput):")
    for s in stages:
        log.info("  %s", s.line())
    return index


def stage_name(fn: Any) -> str:
    """A per-row stage's name for the summary: ImageDownloader -> download, ClipScorer -> clip, text_hashes -> ..."""
    name = getattr(fn, "__name__", str(fn))
    return {"ImageDownloader": "download", "ClipScorer": "clip score"}.get(name, name)


def stage_rows(kind: Kind, cfg: Any, chain: tuple[FilterConfig, ...], units: list[Unit]) -> StageSummary | None:
    """The per-row half: every unit not yet staged, through the stage graph, into staging; its summary (None when
    an earlier run staged everything)."""
    todo = pending_units(cfg.output, units)
    log.info("%d units, %d to process (%d staged by an earlier run)", len(units), len(todo), len(units) - len(todo))
    summary = None
    if todo:
        planned = [u.stop - u.start if u.fmt == "parquet" and u.stop else None for u in todo]
        total = None if None in planned else sum(planned)  # rows are known up front for parquet row ranges only
        rows = kept = 0
        bar = Progress(f"{kind.name}: read, per-row stages, staging", total)
        for b in build(kind, cfg, chain, todo).iter_batches(batch_size=None):
            n = int(b["rows"].sum())
            rows, kept = rows + n, kept + int(b["kept"].sum())
            bar.update(n)
        names = ", ".join(stage_name(s.fn) for s in kind.stages(cfg, Capacity()))
        summary = StageSummary("per-row", rows, kept, bar.close(), note=f"{len(todo)} units; filters, {names}")
    mark_staged(cfg.output, len(units))
    return summary


def build(kind: Kind, cfg: Any, chain: tuple[FilterConfig, ...], units: list[Unit]):
    """The per-row stage graph as a lazy ray.data.Dataset ending in the staging writer."""
    import ray
    from ray.data import ActorPoolStrategy

    cap = cluster_capacity(cfg)
    stages = kind.stages(cfg, cap)
    for s in stages:
        if s.actors:
            log.info(
                "%s: %d to %d actors, %g CPU and %g GPU each", stage_name(s.fn), *s.actors, s.num_cpus, s.num_gpus or 0
            )
    batch = kind.batch_size(cfg)

    def filters(ds, names: set[str] | None, late: bool = False):  # the chain's filters on these scorer columns
        def here(f: type) -> bool:  # names None: the filters that need no scorer; late: those that count what
            if getattr(f, "late", False):  # every scorer left (e.g. a document's images after relevance)
                return late
            return not late and (bool(set(f.needs) & names) if names else not f.needs)

        part = tuple(c for c in chain if here(get_filter(c.name)))
        if not part:
            return ds
        return ds.map_batches(apply_chain, fn_kwargs={"cfg": part}, batch_size=batch, num_cpus=kind.filter_cpus)

    def apply(ds, s: Stage):
        if isinstance(s.fn, type):
            compute = ActorPoolStrategy(min_size=s.actors[0], max_size=s.actors[1])
            kwargs = {"fn_constructor_kwargs": {"cfg": s.cfg}, "compute": compute, "zero_copy_batch": False}
        else:
            kwargs = {"fn_kwargs": {"cfg": s.cfg}}
        return ds.map_batches(s.fn, batch_size=s.batch_size, num_cpus=s.num_cpus, num_gpus=s.num_gpus, **kwargs)

    ds = ray.data.from_items(unit_specs(units), override_num_blocks=len(units))  # -> unit
    ds = ds.map_batches(  # -> key, src_file, src_row, drop_reason, extra, the kind's input columns, _unit
        read_pending,
        batch_size=1,
        num_cpus=kind.read_cpus,
        fn_kwargs={"reader": kind.read, "cfg": cfg.input, "output": cfg.output},
    )
    if stages and isinstance(stages[0].fn, type):
        # Ray Data does not split a block across actors, and a unit can be a whole parquet row group: cut the
        # blocks to the first stage's batch (streaming, no barrier) so that every actor gets work
        ds = ds.repartition(target_num_rows_per_block=stages[0].batch_size)
    for s in (s for s in stages if s.place == "before"):  # -> + e.g. image, width, height, sha256, download_*
        ds = apply(ds, s)
    ds = filters(ds, None)  # -> + a score column per filter, drop_reason
    for s in (s for s in stages if s.place == "score"):  # -> + e.g. clip_score, then the filters thresholding it
        ds = filters(apply(ds, s), set(s.provides))
    ds = filters(ds, None, late=True)
    for s in (s for s in stages if s.place == "after"):  # -> + e.g. text_hash, mh_bands
        ds = apply(ds, s)
    return ds.map_batches(  # -> rows (one count per batch committed to staging)
        write_staging,
        batch_size=batch,
        num_cpus=0.25,
        fn_kwargs={"output": cfg.output, "types": kind.columns, "size_col": kind.size_col, "payload": kind.payload},
    )
