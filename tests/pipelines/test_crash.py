"""kill -9 of a real `mm1data run` at seeded moments over both halves, then the same command: the output equals an
uninterrupted run's, nothing lost or doubled, no partial file visible, committed shards not rewritten."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import jpeg

from mm1data.cli import main
from mm1data.demo import ImageServer, Route
from mm1data.shards import read_index

SETTINGS = [
    "clip.enabled=false",
    "filters=[]",
    "download.allow_private_hosts=true",
    "download.threads=2",
    "download.batch_size=4",
    "download.image_size=96",
    "input.bytes_per_unit=600",  # about 6 rows a unit: many units, cut inside lines
    "shards.samples_per_shard=2",
    "shards.workers=1",  # shards one at a time, so a kill lands between them
]


def samples(out) -> list[tuple[str, tuple]]:
    """Every sample of every listed shard, in order: (key, ((member, bytes), ...)), the json without the one field
    that is a measurement of the run (download_time_s)."""
    found = []
    for s in read_index(str(out))["shards"]:
        with tarfile.open(out / s["path"]) as tar:
            by_key: dict[str, list] = {}
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                if m.name.endswith(".json"):
                    data = {k: v for k, v in json.loads(data).items() if k != "download_time_s"}
                by_key.setdefault(m.name.split(".", 1)[0], []).append((m.name, data))
        found += [(k, tuple(v)) for k, v in by_key.items()]
    return found


def start(cmd, env, log):
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.mark.slow
def test_kill_9_at_five_moments_then_rerun_gives_the_uninterrupted_output(ray_session, tmp_path):
    with ImageServer({}) as server:
        lines = []
        for i in range(60):
            server.routes[f"/k/{i}.jpg"] = Route(jpeg(120, 100, seed=1000 + i), delay_s=0.03)
            lines.append({"url": server.url(f"/k/{i}.jpg"), "caption": f"killed run image {i}"})
        server.routes["/copy.jpg"] = server.routes["/k/3.jpg"]
        lines += [dict(lines[5]), {"url": server.url("/copy.jpg"), "caption": "the same image"}]  # dup_url, dup_image
        inp = tmp_path / "in.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in lines))

        def args(out):
            sets = [a for o in SETTINGS for a in ("--set", o)]
            return ["run", "pipelines/caption.yaml", "--input", str(inp), "--output", str(out), *sets]

        # the uninterrupted run and the reruns go through the same CLI in this process (on the suite's Ray, to
        # save a Ray start each); the runs that get killed are real processes with a Ray of their own
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        ref = tmp_path / "ref"
        assert main(args(ref)) == 0
        expected, ref_index = samples(ref), read_index(str(ref))
        assert len(expected) == 60 and read_index(str(ref))["funnel"]["dropped"] == {"dup_image": 1, "dup_url": 1}
        n_units = len(list((ref / "_staging" / "rows").iterdir()))
        n_shards = len(read_index(str(ref))["shards"])

        # five moments, seeded, over both halves: while units are staged, as units are decided, between shards
        rng = np.random.default_rng(0)
        moments = [
            ("_staging/rows/*/part-*.parquet", int(rng.integers(1, n_units // 2))),
            ("_staging/rows/*/part-*.parquet", int(rng.integers(n_units // 2, n_units))),
            ("_staging/decided/*.parquet", int(rng.integers(1, n_units))),
            ("caption-*.tar", int(rng.integers(1, n_shards // 2))),
            ("caption-*.tar", int(rng.integers(n_shards // 2, n_shards))),
        ]
        for i, (pattern, count) in enumerate(moments):
            out = tmp_path / f"run{i}"
            with open(tmp_path / f"run{i}.log", "wb") as log:
                proc = start([sys.executable, "-m", "mm1data.cli", *args(out)], env, log)
                t0, reached = time.time(), False
                while time.time() - t0 < 300 and proc.poll() is None:
                    if len(list(out.glob(pattern))) >= count:
                        reached = True
                        break
                    time.sleep(0.01)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            assert reached, (pattern, count, (tmp_path / f"run{i}.log").read_text()[-3000:])
            assert not (out / "index.json").exists()
            records = {p.stem for p in (out / "_staging" / "shards").glob("*.json")}
            committed = {p.name: p.stat().st_mtime_ns for p in out.glob("caption-*.tar") if p.name in records}

            assert main(args(out)) == 0
            assert samples(out) == expected, (pattern, count)
            index = read_index(str(out))
            assert [s["num_samples"] for s in index["shards"]] == [s["num_samples"] for s in ref_index["shards"]]
            assert not list(out.glob(".tmp-*")) and not list((out / "meta").glob(".tmp-*"))
            assert sorted(p.name for p in out.glob("caption-*.tar")) == [s["path"] for s in index["shards"]]
            meta = pq.read_table(out / "meta").to_pylist()
            assert len(meta) == len(lines) == len({m["key"] for m in meta})
            assert all(
                p.stat().st_mtime_ns == committed[p.name] for p in out.glob("caption-*.tar") if p.name in committed
            )
