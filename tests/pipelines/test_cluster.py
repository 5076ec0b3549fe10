"""mm1data on a real multi-node Ray cluster on loopback (tests/cluster.py): a node that joins mid-run gets work, a
GPU stage declared in the run config waits for a GPU node, and `ray job submit` runs a job end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster import BIN, LocalCluster
from conftest import jpeg

from mm1data.demo import ImageServer, Route
from mm1data.shards import read_index

pytestmark = pytest.mark.cluster
pytest.importorskip("aiohttp", reason="the dashboard (job submission, state API) needs ray[default]: the test extra")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One head node (1 CPU, no GPU) for this module's tests; stopped even when a test fails."""
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_node(cpus=1, head=True)
        yield c
    finally:
        c.stop()


def actors(c: LocalCluster, stage: str) -> list[dict]:
    """The cluster's actors of a Ray Data stage (class names like MapWorker(MapBatches(ClipScorer)))."""
    return [a for a in c.state("actors") if stage in (a.get("class_name") or "")]


def test_a_node_joining_mid_run_takes_the_gpu_stage_and_work(cluster, tmp_path):
    # CLIP declares a GPU (clip.num_gpus=1) on a cluster with none: the run starts, its CLIP actor waits for a GPU
    # (on a `ray up` cluster the autoscaler starts a GPU worker for it); a node with 2 CPUs and a GPU joins, and the
    # run finishes there. The GPU is Ray's resource only (no CUDA here): the scorer runs on the node's CPU.
    t0 = time.monotonic()
    with ImageServer({}) as srv:
        rows = []
        for i in range(120):
            srv.routes[f"/{i}.jpg"] = Route(jpeg(64 + i % 7, 64, seed=i), delay_s=0.05)
            rows.append({"url": srv.url(f"/{i}.jpg"), "caption": f"picture number {i}"})
        src = tmp_path / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=20)
        out = tmp_path / "out"
        sets = [
            "clip.model=mm1data-tiny-clip", "clip.pretrained=null", "clip.num_gpus=1", "clip.batch_size=16",
            "download.allow_private_hosts=true", "download.batch_size=10", "download.threads=4", "filters=[]",
            "input.rows_per_unit=20", "cluster.max_cpus=3",
        ]  # fmt: skip
        cmd = [str(BIN / "mm1data"), "run", "caption", "--input", str(src), "--output", str(out)]
        cmd += ["--address", cluster.address] + [a for s in sets for a in ("--set", s)]
        log = tmp_path / "run.log"
        with open(log, "wb") as f:
            run = subprocess.Popen(cmd, env=cluster.env(HF_HUB_OFFLINE="1"), stdout=f, stderr=subprocess.STDOUT)
        try:
            cluster.wait_for(lambda: actors(cluster, "ClipScorer") or run.poll() is not None, "the CLIP actor", 90)
            assert run.poll() is None, log.read_text()[-3000:]
            pending = actors(cluster, "ClipScorer")
            assert {a["state"] for a in pending} <= {"PENDING_CREATION", "DEPENDENCIES_UNREADY"}, pending
            print(f"CLIP actor pending: {time.monotonic() - t0:.1f} s")
            cluster.start_node(cpus=2, gpus=1)
            print(f"joined: {time.monotonic() - t0:.1f} s")
            assert run.wait(timeout=180) == 0, log.read_text()[-3000:]
        finally:
            if run.poll() is None:
                run.kill()
    print(f"run done: {time.monotonic() - t0:.1f} s")
    head = next(n["node_id"] for n in cluster.alive_nodes() if n["is_head_node"])
    joined = next(n["node_id"] for n in cluster.alive_nodes() if not n["is_head_node"])
    clip = actors(cluster, "ClipScorer")
    assert clip and {a["node_id"] for a in clip} == {joined}  # the GPU stage ran on the node that joined
    downloads = actors(cluster, "ImageDownloader")
    tasks = [t for t in cluster.state("tasks") if t.get("node_id") == joined and t.get("type") == "NORMAL_TASK"]
    assert tasks  # the run's tasks (read, filters, staging, the corpus-wide half) spread to the CPUs that joined
    print(
        f"cluster join: {time.monotonic() - t0:.1f} s; download actors per node:",
        {n: sum(a["node_id"] == n for a in downloads) for n in (head, joined)},
        f"tasks on the joined node: {len(tasks)}",
    )
    index = read_index(str(out))
    assert index["funnel"]["kept"] == len(rows)
    meta = pq.read_table(out / "meta", columns=["clip_score"]).column("clip_score").to_pylist()
    assert len(meta) == len(rows) and all(s == s for s in meta)  # every row scored (NaN: not scored)


def test_ray_job_submit_runs_a_corpus_job_with_the_token(cluster, tmp_path):
    # the README's command on a real cluster: the working dir travels without its .venv (the checkout's .rayignore;
    # .gitignore, which Ray also reads, is left out here), and Ray 2.60's
    # job API refuses a client that does not send the token (RAY_AUTH_MODE unset) with "Missing authentication token"
    t0 = time.monotonic()
    wd = tmp_path / "job"
    (wd / ".venv").mkdir(parents=True)
    (wd / ".venv" / "big").write_bytes(b"\0" * 1024)
    shutil.copy(ROOT / ".rayignore", wd)
    words = [f"w{i}" for i in range(500)]
    docs = [" ".join(words[(7 * d + k * k) % 500] for k in range(60)) for d in range(40)]
    (wd / "corpus.jsonl").write_text("".join(json.dumps({"text": t, "id": str(i)}) + "\n" for i, t in enumerate(docs)))
    out = tmp_path / "out"
    job = f"test ! -e .venv && mm1data run text --input corpus.jsonl --output {out} --set filters=[] --address auto"
    cmd = ["job", "submit", "--address", cluster.dashboard, "--working-dir", str(wd), "--", "sh", "-c", job]
    env = cluster.env()
    del env["RAY_AUTH_MODE"]  # as in a shell where it was never set
    refused = subprocess.run([str(BIN / "ray"), *cmd], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stdout + refused.stderr
    done = cluster.ray(*cmd, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"ray job submit: {time.monotonic() - t0:.1f} s")
    index = read_index(str(out))
    assert index["totals"]["samples"] == len(docs)
    assert [s["num_samples"] for s in index["shards"]] == [len(docs)]
    with tarfile.open(out / index["shards"][0]["path"]) as tar:
        texts = sorted(m.name for m in tar.getmembers() if m.name.endswith(".txt"))
    assert len(texts) == len(docs)
    meta = pq.read_table(out / "meta", columns=["key", "drop_reason"])
    assert meta.num_rows == len(docs) and set(meta.column("drop_reason").to_pylist()) == {""}
