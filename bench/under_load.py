"""Under load: memory of `sample` over 10,000 images (1 and 2 processes) and of `select` / `evaluate`
(2 processes) on all of them. Prints peak RSS against the number of images written (run by hand).

    .venv/bin/python bench/under_load.py                       # tiny models built here (tests' builders)
    .venv/bin/python bench/under_load.py --n 10000 --steps 10 --procs 1,2
    .venv/bin/python bench/under_load.py --model runs/default/ldm/model \
        --classifier runs/default/adapt/latent_classifier/model --data runs/default/data/target

Each command runs as a subprocess (process tree: the launcher and its workers); a monitor thread
samples the RSS of every process of the tree every 0.25 s, and the number of PNGs on disk. Reported:
the tree's peak RSS (sum over processes) and the largest single process, up to the moment 1,000 /
5,000 / 10,000 images were on disk. The claim tested: sampling memory does not grow with the
number of images (one batch of latents and images at a time; progress rows are appended to a file);
select and evaluate hold the sample images in memory by design (N x H x W x 3 bytes plus features),
which is stated as their bound.

Measured on the 2-core development machine while other jobs ran (load 4-7), tiny models (UNet (16, 32)
on 4x8x8 latents, 32 px images), DPM-Solver++ 2 steps, batch 64:
  sample, 1 process: peak RSS 1086 / 1087 / 1095 MB by 1,000 / 5,000 / 10,000 images (flat: +9 MB),
    1119 MB overall (rank 0 reads the 10,000 progress rows back to write samples.csv: O(N) rows, ~2.5 KB each);
  sample, 2 processes (torchrun): tree 2893 / 2893 / 2906 MB, largest worker 1089 / 1089 / 1104 MB;
  select on 1,000 / 5,000 / 10,000 samples: 1364 / 1399 / 1504 MB (before the blockwise k-NN radii in
  metrics.precision_recall: 1340 / 1605 / 2897 MB, an N x N distance matrix);
  evaluate, 2 processes, 10,000 samples: largest worker 1153 MB, tree 2981 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


class Monitor(threading.Thread):
    """Samples the RSS of a process tree and the number of images written, until stopped."""

    def __init__(self, proc: subprocess.Popen, images: Path | None, every: float = 0.25):
        super().__init__(daemon=True)
        self.root = psutil.Process(proc.pid)
        self.images, self.every = images, every
        self.trace: list[tuple[float, float, float, int]] = []  # (t, tree MB, max single MB, images)
        self.stop = threading.Event()
        self.t0 = time.time()

    def _count(self) -> int:
        if self.images is None or not self.images.is_dir():
            return 0
        return sum(1 for e in os.scandir(self.images) if e.name.endswith(".png") and not e.name.startswith("."))

    def run(self) -> None:
        last_count, next_count = 0, 0.0
        while not self.stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            now = time.time()
            if now >= next_count:  # listing 10,000 files: once a second is enough
                last_count, next_count = self._count(), now + 1.0
            self.trace.append((now - self.t0, sum(rss) / MB, max(rss, default=0) / MB, last_count))
            time.sleep(self.every)


def run_monitored(cmd: list[str], images: Path | None, env: dict) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    mon = Monitor(proc, images)
    mon.start()
    _, err = proc.communicate()
    mon.stop.set()
    mon.join()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err.decode()[-3000:]}")
    return {"seconds": round(time.time() - t0, 1), "trace": mon.trace}


def peaks_by_count(trace, marks) -> list[dict]:
    out = []
    for m in marks:
        upto = [r for r in trace if r[3] < m] + [next((r for r in trace if r[3] >= m), trace[-1])]
        reached = next((r for r in trace if r[3] >= m), None)
        out.append({"images": m, "reached_s": round(reached[0], 1) if reached else None,
                    "peak_tree_mb": round(max(r[1] for r in upto), 1),
                    "peak_process_mb": round(max(r[2] for r in upto), 1),
                    "rss_tree_mb_at": round(reached[1], 1) if reached else None})
    return out


def build_tiny(root: Path) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers_sample import make_labeled_cache, make_latent_classifier, make_ldm

    if (root / "clf" / "histodiffusion.json").is_file():  # built by an earlier run
        return {"model": root / "ldm", "classifier": root / "clf", "data": root / "in" / "data"}
    data, vae, cache = make_labeled_cache(root / "in", n=40)
    ldm = make_ldm(root / "ldm", vae)
    clf = make_latent_classifier(root / "clf", cache, ldm / "scheduler")
    return {"model": ldm, "classifier": clf, "data": data}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="images to sample (split evenly over the classes)")
    ap.add_argument("--steps", type=int, default=10, help="DPM-Solver++ steps")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--procs", default="1,2", help="process counts for sampling")
    ap.add_argument("--model", default="", help="exported LDM folder (default: a tiny untrained one built here)")
    ap.add_argument("--classifier", default="")
    ap.add_argument("--data", default="", help="labeled target dataset of the classifier (select / evaluate)")
    ap.add_argument("--out", default="/tmp/histodiffusion_under_load")
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    arts = ({"model": Path(args.model), "classifier": Path(args.classifier), "data": Path(args.data)}
            if args.model else build_tiny(out / "models"))
    classes = json.loads((Path(arts["classifier"]) / "histodiffusion.json").read_text())["classes"]
    per_class = -(-args.n // len(classes))
    marks = [m for m in (1_000, 5_000, 10_000) if m <= per_class * len(classes)] or [per_class * len(classes)]
    results: dict = {"n": per_class * len(classes), "steps": args.steps, "batch_size": args.batch_size,
                     "cpu_count": os.cpu_count(), "sample": {}}
    first_samples = None
    for procs in [int(p) for p in args.procs.split(",")]:
        s_out = out / f"samples_{procs}p"
        launcher = ([sys.executable, "-m", "histodiffusion"] if procs == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                     "-m", "histodiffusion"])
        cmd = launcher + ["sample", "--model", str(arts["model"]), "--classifier", str(arts["classifier"]),
                          "--out", str(s_out), "--n-per-class", str(per_class), "--steps", str(args.steps),
                          "--scheduler", "dpmsolver++", "--batch-size", str(args.batch_size), "--grid", "false"]
        e = dict(env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // procs)))
        r = run_monitored(cmd, s_out / "images", e)
        peaks = peaks_by_count(r["trace"], marks)
        results["sample"][f"{procs}p"] = {"seconds": r["seconds"], "img_per_s": round(results["n"] / r["seconds"], 1),
                                         "peaks": peaks, "peak_tree_mb": round(max(x[1] for x in r["trace"]), 1)}
        print(f"sample, {procs} process(es): {results['n']} images in {r['seconds']:.0f}s "
              f"({results['n'] / r['seconds']:.1f} img/s)")
        for p in peaks:
            print(f"  by {p['images']:>6} images: peak RSS {p['peak_tree_mb']:.0f} MB (tree), "
                  f"{p['peak_process_mb']:.0f} MB (largest process); at that moment {p['rss_tree_mb_at']} MB")
        first_samples = first_samples or s_out
    if not args.skip_eval:
        from histodiffusion.runtime.artifacts import read_dataset

        _, rows = read_dataset(arts["data"])
        real = {c: sum(r["split"] == "train" and r["label"] == c for r in rows) for c in classes}
        ratio = max(0.01, int(100 * min(per_class / max(1, n) for n in real.values())) / 100)  # use ~all samples
        for stage, cmd in [
            ("select", [sys.executable, "-m", "histodiffusion", "select", "--samples", str(first_samples), "--data",
                        str(arts["data"]), "--subset", "train", "--backbone", "small_cnn_w8", "--feature-steps", "50"]),
            ("evaluate_2p", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "histodiffusion", "evaluate", "--data", str(arts["data"]), "--subset", "train",
                             "--samples", str(first_samples), "--arms", "real,unselected", "--ratios", f"{ratio:g}",
                             "--seeds", "0,1", "--backbone", "small_cnn_w8", "--epochs", "1", "--steps-per-epoch", "20",
                             "--batch-size", "32", "--out", str(out / "eval")]),
        ]:
            e = dict(env, OMP_NUM_THREADS="1")
            r = run_monitored(cmd, None, e)
            results[stage] = {"seconds": r["seconds"], "peak_tree_mb": round(max(x[1] for x in r["trace"]), 1),
                              "peak_process_mb": round(max(x[2] for x in r["trace"]), 1)}
            print(f"{stage} on {results['n']} samples: {r['seconds']:.0f}s, peak RSS {results[stage]['peak_tree_mb']:.0f} MB "
                  f"(tree), {results[stage]['peak_process_mb']:.0f} MB (largest process)")
    (out / "under_load.json").write_text(json.dumps(results, indent=2))
    print(f"written {out / 'under_load.json'}")


if __name__ == "__main__":
    main()
