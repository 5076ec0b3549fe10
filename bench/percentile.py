"""The exact percentile threshold on Ray against a sort in one process: wall time and driver memory against rows.

Scores: float32 drawn like CLIP cosines (normal around 0.25, sd 0.05, with 1% ties at 0.3), in Ray blocks of
1M rows (what the candidates of split.finalize look like). `select` runs two histogram passes over the blocks and
keeps 65,536 bins on the driver; the peer sorts all the scores in the driver process (what an exact threshold
with np.sort, or DataComp's get_threshold, does) and np.partition (a selection in place, no full sort). Both must
give the same value (asserted: exactness is the point; the timings are only printed). The driver's RSS growth over
the select is printed too (the scores are put into Ray's object store first, outside the measure).

    .venv/bin/python bench/percentile.py [--rows 1e6,1e7] [--block 1e6]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1e6,1e7")
    p.add_argument("--block", type=float, default=1e6)
    args = p.parse_args()
    import ray

    from mm1data import progress
    from mm1data.percentile import exact_threshold, select

    progress.quiet_ray()

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"{'rows':>12} {'ray select s':>13} {'np.sort s':>10} {'partition s':>12} {'driver +MB':>11}  threshold")
    for n in (int(float(x)) for x in args.rows.split(",")):
        rng = np.random.default_rng(0)
        scores = rng.normal(0.25, 0.05, n).astype(np.float32)
        scores[rng.random(n) < 0.01] = np.float32(0.3)
        block = int(args.block)
        ds = ray.data.from_numpy_refs([ray.put(scores[a : a + block]) for a in range(0, n, block)])
        ds = ds.map_batches(lambda b: {"_s0_score": b["data"]}).materialize()
        before = rss_mb()
        t0 = time.perf_counter()
        _, value, _ = select(ds, "_s0_score", 70, "min")
        t1 = time.perf_counter()
        grown = rss_mb() - before
        expect = exact_threshold(scores, 70, "min")
        t2 = time.perf_counter()
        k = int(np.ceil(n * 0.7))
        part = float(np.partition(scores, k)[k])
        t3 = time.perf_counter()
        assert value == expect == part, (value, expect, part)
        print(f"{n:>12,} {t1 - t0:>13.2f} {t2 - t1:>10.2f} {t3 - t2:>12.2f} {grown:>11.1f}  {value:.6f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"driver peak RSS {peak:.0f} MB (it holds the scores for the peer)")


if __name__ == "__main__":
    main()
