"""How stages ask for resources (runner.cluster_capacity, model_gpus, model_pool, download_pool): GPUs requested
from the run config or the autoscaler's bounds, elastic actor pools, and the 2-CPU local machine unchanged."""

from __future__ import annotations

import pytest

from mm1data.config import ConfigError
from mm1data.pipelines import caption, interleaved, load_run_config
from mm1data.pipelines.runner import Capacity, cluster_capacity, model_gpus

LOCAL = Capacity(cpus=2, max_cpus=2, max_gpus=0)  # `make test`'s machine: 2 CPUs, no GPU, no autoscaler


def config(kind: str, *sets: str):
    return load_run_config(kind, list(sets))[1]


def pools(stages) -> dict[str, tuple]:
    return {s.fn.__name__: (s.actors, s.num_cpus, s.num_gpus) for s in stages}


def test_two_cpus_without_gpus_keep_one_download_and_one_cpu_clip_actor():
    # actors hold their share while idle: 0.5 (download) + 0.5 (CPU CLIP) leaves a CPU for the tasks
    got = pools(caption.stages(config("caption"), LOCAL))
    assert got == {"ImageDownloader": ((1, 1), 0.5, None), "ClipScorer": ((1, 1), 0.5, None)}
    got = pools(interleaved.stages(config("interleaved"), LOCAL))
    assert got["DocumentImages"] == ((1, 1), 0.5, None) and got["Relevance"] == ((1, 1), 0.5, None)


def test_a_cluster_that_can_get_gpus_asks_for_them_with_none_present():
    # ray up with GPU workers at min 0: none at the start, 4 at most; CLIP asks for a GPU per actor (the autoscaler
    # starts GPU workers for them) and grows to one actor per GPU; downloads grow to the CPU bound
    cap = Capacity(cpus=1, max_cpus=16 * 32, max_gpus=4)
    got = pools(caption.stages(config("caption"), cap))
    assert got["ClipScorer"] == ((1, 4), 1.0, 1.0)
    assert got["ImageDownloader"] == ((1, 511), 0.5, None)


def test_num_gpus_in_the_run_config_decides_alone():
    cap = Capacity(cpus=8, max_cpus=8, max_gpus=0)
    got = pools(caption.stages(config("caption", "clip.num_gpus=1", "clip.workers=2"), cap))
    assert got["ClipScorer"] == ((2, 2), 1.0, 1.0)  # asked for although none is known: 2 actors, as configured
    cap = Capacity(cpus=8, max_cpus=8, max_gpus=8)
    got = pools(caption.stages(config("caption", "clip.num_gpus=0.5", "recaption.enabled=true"), cap))
    assert got["ClipScorer"] == ((1, 16), 1.0, 0.5) and got["CocaCaptioner"] == ((1, 8), 1.0, 1.0)
    got = pools(caption.stages(config("caption", "clip.num_gpus=0"), cap))
    assert got["ClipScorer"] == ((1, 1), 0.5, None)  # 0: CPU only, a fixed pool


def test_download_workers_set_fix_the_pool():
    cap = Capacity(cpus=4, max_cpus=64, max_gpus=0)
    got = pools(caption.stages(config("caption", "download.workers=3", "clip.enabled=false"), cap))
    assert got == {"ImageDownloader": ((3, 3), 0.5, None)}
    got = pools(caption.stages(config("caption", "clip.enabled=false"), cap))
    assert got == {"ImageDownloader": ((4, 64), 0.5, None)}


def test_capacity_follows_the_config_then_the_cluster(ray_session):
    cfg = config("caption")
    assert cluster_capacity(cfg) == Capacity(cpus=2, max_cpus=2, max_gpus=0)  # the suite's Ray: 2 CPUs, no autoscaler
    cfg = config("caption", "cluster.max_cpus=40", "cluster.max_gpus=2")
    assert cluster_capacity(cfg) == Capacity(cpus=2, max_cpus=40, max_gpus=2)
    assert model_gpus(cfg.clip, cluster_capacity(cfg)) == 1.0


def test_a_gpu_minimum_the_cluster_cannot_reach_is_refused():
    with pytest.raises(ConfigError, match="3 model actors at 1 GPU each need 3 GPUs; the cluster can reach 2"):
        caption.stages(config("caption", "clip.workers=3"), Capacity(cpus=8, max_cpus=8, max_gpus=2))


@pytest.mark.parametrize("key", ["cluster.max_cpus=0", "cluster.max_gpus=-1", "cluster.max_cpus=.inf"])
def test_bad_bounds_are_refused(key):
    with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
        config("caption", key)


def test_model_workers_as_min_max():
    # [min, max]: an elastic pool on CPU too; on GPUs the maximum is cut to what the reachable GPUs hold
    got = pools(caption.stages(config("caption", "clip.workers=[1,3]"), Capacity(cpus=8, max_cpus=8, max_gpus=0)))
    assert got["ClipScorer"] == ((1, 3), 0.5, None)
    assert got["ImageDownloader"] == ((7, 7), 0.5, None)  # the model's minimum is what the downloads leave
    cap = Capacity(cpus=8, max_cpus=8, max_gpus=4)
    assert pools(caption.stages(config("caption", "clip.workers=[2,8]"), cap))["ClipScorer"] == ((2, 4), 1.0, 1.0)
    assert pools(caption.stages(config("caption", "clip.workers=[1,2]"), cap))["ClipScorer"] == ((1, 2), 1.0, 1.0)
    got = pools(caption.stages(config("caption", "clip.num_gpus=1", "clip.workers=[1,3]"), LOCAL))
    assert got["ClipScorer"] == ((1, 3), 1.0, 1.0)  # asked for although none is known: as configured
    got = pools(caption.stages(config("caption", "recaption.enabled=true", "recaption.workers=[1,2]"), LOCAL))
    assert got["CocaCaptioner"] == ((1, 2), 0.5, None)
    got = pools(interleaved.stages(config("interleaved", "clip.workers=[1,2]"), LOCAL))
    assert got["Relevance"] == ((1, 2), 0.5, None)


@pytest.mark.parametrize("value", ["0", "[2,1]", "[0,2]", "[1]", "[1,2,3]", "[1,2.5]", "[true,2]", "abc"])
def test_bad_model_workers_are_refused(value):
    with pytest.raises(ConfigError, match=r"clip\.workers"):
        config("caption", f"clip.workers={value}")


def test_shard_writers_in_flight_follow_the_cluster(ray_session, monkeypatch):
    # workers 0: one write_shard task in flight per CPU the cluster has, read again as it runs (a node joins: 2 -> 6
    # CPUs), and at least the CPUs it can reach (queued tasks are the autoscaler's demand); a set number stays fixed
    import ray

    from mm1data import split

    class Task:  # write_shard done at once: what is measured is how many the driver keeps in flight
        def remote(self, output, name, *args):
            return ray.put({"shard": {"path": name}})

    in_flight = []
    wait = ray.wait

    def counted(pending, **kw):
        in_flight.append(len(pending))
        return wait(pending, **kw)

    cpus = iter([2] * 3 + [6] * 100)
    monkeypatch.setattr(split, "CPU_RECHECK_S", 0.0)
    monkeypatch.setattr(ray, "remote", lambda **kw: lambda fn: Task())
    monkeypatch.setattr(ray, "wait", counted)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": next(cpus)})
    jobs = [(f"s{i}", []) for i in range(30)]

    def peak(**kw) -> int:
        in_flight.clear()
        assert sorted(split._write_shards("out", [], jobs, None, **kw)) == sorted(n for n, _ in jobs)
        return max(in_flight)

    assert peak(workers=0) == 6 and in_flight[0] == 2
    assert peak(workers=0, reach=8) == 8
    assert peak(workers=3, reach=8) == 3
