"""How much class information survives the autoencoder (run by hand; issue 11's direct gauge).

For each autoencoder folder given:
  - PSNR / SSIM of posterior-mean reconstructions on the held-out split of every unlabeled dataset
    given (`--unlabeled`, prepared with `--holdout-frac`) and on the unseen target's test tiles;
  - judge ratio: a classifier (the "judge") trained on ALL labeled train tiles of the target
    (LC25000 lung, split by group) classifies the reconstructions of the test split (unseen groups);
    ratio = its accuracy on reconstructions / its accuracy on the raw tiles (goal >= 0.9);
  - clean-latent class accuracy: a logistic regression on the flattened, scaled posterior means of
    the few-shot subset (`--subset`), scored on the test split's latents.

The target dataset and the judge are prepared / trained once and cached under --out.

    .venv/bin/python bench/ae_fidelity.py --vae runs/ae/model/vae,src/histodiffusion/base/.../vae \
        --unlabeled bench/out/base/data/colon,bench/out/base/data/osteo,bench/out/base/data/he
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def prepare_target(out: Path, labels_csv: Path) -> Path:
    from histodiffusion.runtime.config import PrepareConfig
    from histodiffusion.stages import prepare

    d = out / "target"
    prepare.run(PrepareConfig(out=str(d), labels_csv=str(labels_csv), tile_size=64, fewshot_fracs=(0.05, 0.1)))
    return d


def judge(out: Path, target: Path, steps: int, backbone: str):
    """The judge model: trained once on every train tile of the target, cached."""
    from histodiffusion.data.evaldata import load_real
    from histodiffusion.models.classifier import (build_classifier, load_classifier, save_classifier,
                                                  train_classifier)

    d = out / f"judge_{backbone}_{steps}"
    if (d / "classifier.json").is_file():
        model, _ = load_classifier(d)
    else:
        train = load_real(target, "train")
        t0 = time.time()
        model = build_classifier(backbone, len(train.classes), 64)
        train_classifier(model, train.images, train.labels, steps=steps, batch_size=64, lr=1e-3, seed=0,
                         augment=True, desc="judge")
        save_classifier(model, d, {"name": backbone, "classes": train.classes, "num_classes": len(train.classes),
                                   "image_size": 64, "trained_on": f"{target} train ({len(train)} tiles)",
                                   "steps": steps, "seconds": round(time.time() - t0, 1)})
    return model


def psnr_ssim(a_u8: torch.Tensor, b_u8: torch.Tensor) -> tuple[float, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a = a_u8.permute(0, 3, 1, 2).float() / 255
    b = b_u8.permute(0, 3, 1, 2).float() / 255
    p = peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean().item()
    s = structural_similarity_index_measure(b, a, data_range=1.0).item()
    return p, s


def latent_probe(vae, target: Path, subset: str, test_means: torch.Tensor, test_labels: torch.Tensor) -> float:
    from sklearn.linear_model import LogisticRegression

    from histodiffusion.data.evaldata import load_real
    from histodiffusion.models.autoencoder import roundtrip_uint8

    sub = load_real(target, subset)
    _, means = roundtrip_uint8(vae, sub.images)
    sf = float(vae.config.scaling_factor)
    clf = LogisticRegression(max_iter=2000, C=0.1).fit((means * sf).flatten(1).numpy(), sub.labels.numpy())
    return float(clf.score((test_means * sf).flatten(1).numpy(), test_labels.numpy()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="comma-separated autoencoder folders (save_pretrained)")
    p.add_argument("--unlabeled", default="", help="comma-separated prepared unlabeled datasets with a holdout split")
    p.add_argument("--labels-csv", default=str(SHARED / "lc25000_lung" / "labels.csv"))
    p.add_argument("--subset", default="frac0.05", help="few-shot subset for the clean-latent probe")
    p.add_argument("--judge-steps", type=int, default=1200)
    p.add_argument("--judge-backbone", default="small_cnn_w16")
    p.add_argument("--target", default="", help="a prepared LC25000 lung target (64 px, train/test split by group) "
                   "instead of preparing one under --out")
    p.add_argument("--judge", default="", help="a `histodiffusion judge` folder trained on --target's train split "
                   "instead of training one here")
    p.add_argument("--out", default="bench/out/ae_fidelity")
    args = p.parse_args()

    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.data.evaldata import load_real
    from histodiffusion.models.autoencoder import load_vae, roundtrip_uint8
    from histodiffusion.models.classifier import predict

    out = Path(args.out)
    if not Path(args.labels_csv).is_file():
        raise SystemExit(f"labels CSV not found: {args.labels_csv} (the shared LC25000 lung data)")
    target = Path(args.target) if args.target else prepare_target(out, Path(args.labels_csv))
    test = load_real(target, "test")
    if args.judge:
        from histodiffusion.models.judge import load_judge

        model, jinfo = load_judge(args.judge)
        what = f"judge {args.judge} ({jinfo['id']})"
    else:
        model = judge(out, target, args.judge_steps, args.judge_backbone)
        what = f"judge ({args.judge_backbone}, {args.judge_steps} steps)"
    raw_pred = predict(model, test.images)[0].argmax(1)  # once: the raw-tile reference of every autoencoder
    raw_acc = float((raw_pred == test.labels).float().mean())
    print(f"{what} on raw test tiles: {raw_acc:.3f} ({len(test)} tiles of unseen groups)")
    held = {}
    for d in filter(None, args.unlabeled.split(",")):
        ds = PixelDataset(d, "holdout")
        held[Path(d).name] = torch.stack([ds.uint8(i) for i in range(len(ds))])
    names = list(held)
    head = ("| autoencoder | " + " | ".join(f"{n} PSNR / SSIM" for n in names) + " | lung test PSNR / SSIM "
            "| judge on recon (x raw) | judge per class on recon (raw) | clean-latent probe |")
    rows = [head, "|" + "---|" * (len(names) + 5)]
    results = []
    for v in args.vae.split(","):
        vae = load_vae(v)
        cells, res = [], {"vae": v}
        for n in names:
            rec, _ = roundtrip_uint8(vae, held[n])
            ps, ss = psnr_ssim(held[n], rec)
            res[n] = {"psnr": ps, "ssim": ss, "tiles": len(rec)}
            cells.append(f"{ps:.2f} / {ss:.3f}")
        rec, means = roundtrip_uint8(vae, test.images)
        ps, ss = psnr_ssim(test.images, rec)
        probs, _ = predict(model, rec)
        acc = float((probs.argmax(1) == test.labels).float().mean())
        # per class: which class's cues the round trip loses (recall of the judge on reconstructions vs raw)
        per_class = {c: {"recon": float((probs.argmax(1)[test.labels == k] == k).float().mean()),
                         "raw": float((raw_pred[test.labels == k] == k).float().mean())}
                     for k, c in enumerate(test.classes)}
        probe = latent_probe(vae, target, args.subset, means, test.labels)
        res.update(lung={"psnr": ps, "ssim": ss}, judge_recon=acc, judge_raw=raw_acc, judge_ratio=acc / raw_acc,
                   judge_per_class=per_class, latent_probe=probe)
        results.append(res)
        rows.append(f"| {v} | " + " | ".join(cells) + f" | {ps:.2f} / {ss:.3f} | {acc:.3f} ({acc / raw_acc:.2f}x) | "
                    + ", ".join(f"{c} {r['recon']:.2f} ({r['raw']:.2f})" for c, r in per_class.items())
                    + f" | {probe:.3f} |")
        print(rows[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
