"""Time and peak memory of `prepare` on all of ../shared/data at 64 px (and on growing lung subsets,
to show that memory stays flat in the number of tiles).

    .venv/bin/python bench/prepare_shared.py [--shared ../shared/data] [--tile-size 64]

Each measurement runs in a fresh child process, which reports its wall time, its peak RSS
(resource.getrusage ru_maxrss) and the peak of traced Python/numpy allocations (tracemalloc).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(spec: dict) -> None:
    import resource
    import tracemalloc

    from histodiffusion.runtime.config import PrepareConfig
    from histodiffusion.stages.prepare import run

    tracemalloc.start()
    t0 = time.perf_counter()
    meta = json.loads((run(PrepareConfig(**spec)) / "meta.json").read_text())
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"tiles": meta["count"], "seconds": dt, "cpu": ru.ru_utime + ru.ru_stime,
                      "peak_rss_mb": ru.ru_maxrss / 1024, "traced_peak_mb": peak / 2**20}))


def measure(spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--tile-size", type=int, default=64)
    ap.add_argument("--child", default="")
    a = ap.parse_args()
    if a.child:
        return child(json.loads(a.child))
    shared = Path(a.shared)
    labels = shared / "lc25000_lung" / "labels.csv"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = list(csv.DictReader(open(labels, newline="")))
        print(f"prepare at {a.tile_size} px (fresh process per line)")
        print(f"{'data set':34s} {'tiles':>6s} {'seconds':>8s} {'cpu s':>6s} {'tiles/s':>8s} {'peak RSS MB':>12s} {'traced MB':>10s}")
        total = 0.0
        jobs = []
        for n in (1500, 6000):  # lung subsets (whole file list prefixes) to show flat memory
            sub = tmp / f"sub{n}" / "labels.csv"
            sub.parent.mkdir()
            with open(sub, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["path", "label", "group_id"])
                w.writeheader()
                w.writerows({**r, "path": str((labels.parent / r["path"]).resolve())} for r in rows[:n])
            jobs.append((f"lc25000_lung first {n}", {"labels_csv": str(sub)}, False))
        jobs.append(("lc25000_lung (all)", {"labels_csv": str(labels)}, True))
        jobs.append(("unlabeled_he (5 images)", {"sources": [str(shared / "unlabeled_he")],
                                                 "exclude": [str(tmp / "lc25000_lung (all)")]}, True))
        for name, spec, counted in jobs:
            m = measure({"out": str(tmp / name), "tile_size": a.tile_size, **spec})
            total += m["seconds"] if counted else 0.0
            print(f"{name:34s} {m['tiles']:6d} {m['seconds']:8.1f} {m['cpu']:6.1f} {m['tiles'] / m['seconds']:8.0f} "
                  f"{m['peak_rss_mb']:12.0f} {m['traced_peak_mb']:10.1f}")
        print(f"all of {shared} at {a.tile_size} px: {total:.1f} s wall (target < 120 s); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
