"""Report sections on the quality of the chain's parts, each shown when its record exists: the latent
classifier's validation accuracy per timestep bucket against an image-space classifier
(<latent classifier run>/metrics.json) and the class fidelity of the samples according to the
independent judge (<samples>/fidelity.json, written by `histodiffusion judge`)."""
from __future__ import annotations

from ...runtime.fileio import read_json, sha256_file
from .doc import Doc, fmt, rate


def section_latent_classifier(doc: Doc, p: dict) -> None:
    path = p["latent_classifier"] / "metrics.json"
    if not path.is_file():
        return
    m = read_json(path, "latent classifier metrics")
    by_t = m.get("val_accuracy_by_t")
    if not by_t:
        return
    image = m.get("image_classifier")
    ratios = m.get("ratio_to_image_by_t") or {}
    doc.h(2, "Latent classifier")
    doc.p(f"Validation accuracy of the noise-aware latent classifier p(y | z_t, t) on the {m.get('n_val')} "
          f"{m.get('val_subset')!r} latents, noised at a random t inside each timestep bucket (trained on "
          f"{m.get('n_train')} latents of {m.get('train_subset')!r} for {m.get('steps')} steps; chance "
          f"{fmt(m.get('chance'))}).")
    if image:
        doc.p(f"Image classifier: {image['backbone']} on the pixels of the same {image['n_train']} training tiles "
              f"with the same budget ({image['steps']} steps of {image['batch_size']}, lr {image['lr']}, weight decay "
              f"{image['weight_decay']}, class-balanced batches, augment {image['augment']}), scored on the clean "
              f"pixels of the same validation tiles: accuracy {fmt(image['val_accuracy'])}.")
    rows = [[b, fmt(a), fmt(image["val_accuracy"]) if image else "–", fmt(ratios.get(b), 2)]
            for b, a in by_t.items()]
    doc.table(["timestep bucket", "latent classifier val accuracy", "image classifier val accuracy",
               "ratio latent / image"], rows, "latent classifier strength per timestep bucket")
    g = m.get("goal")
    if g and g.get("ratio") is not None:
        doc.p(f"Goal: at least {g['target']} x the image classifier's accuracy at t in {g['bucket']}: "
              f"{g['ratio']:.2f}, {'met' if g['met'] else 'missed'}.")


def section_fidelity(doc: Doc, p: dict) -> None:
    path = p["samples"] / "fidelity.json"
    if not path.is_file():
        return
    f = read_json(path, "class fidelity")
    j = f["judge"]
    doc.h(2, "Class fidelity (independent judge)")
    doc.p(f"Share of synthetic samples that an independent judge assigns to their target class (95% Wilson "
          f"intervals). The judge ({j.get('name')}, id {j.get('id')}) was trained on the {j.get('n_train')} labeled "
          f"tiles of {j.get('subset')!r} of {j.get('data')} (train split only: never a validation or test tile) and "
          f"is neither the latent classifier that guided the samples nor the selection classifier; its accuracy "
          f"on {j.get('n_val')} {j.get('val_subset')!r} tiles is {fmt(j.get('val_accuracy'))}. Macro fidelity: all "
          f"{fmt(f['all'].get('macro_fidelity'))}, kept {fmt((f.get('kept') or {}).get('macro_fidelity'))}.")
    filtered = p["select"] / "filtered.csv"
    now = sha256_file(filtered) if filtered.is_file() else None
    if now != f.get("filtered_csv_sha256"):
        doc.p("Note: filtered.csv changed since the judge ran (re-run `histodiffusion judge` for the kept column).")
    kept = f.get("kept")
    rows = []
    for c in f["classes"]:
        a = f["all"]["per_class"][c]
        k = kept["per_class"][c] if kept else None
        rows.append([c, a["n"], a["hits"], rate(a), k["n"] if k else "–", k["hits"] if k else "–", rate(k)])
    rows.append(["all classes", f["all"]["n"], f["all"]["hits"], rate(f["all"]), kept["n"] if kept else "–",
                 kept["hits"] if kept else "–", rate(kept)])
    doc.table(["target class", "samples", "judged as target", "fidelity (all)", "kept", "kept judged as target",
               "fidelity (kept)"], rows, "class fidelity per target class")
    for key, which in (("realism", "all samples"), ("realism_kept", "kept samples")):
        real = f.get(key)
        if real:
            fd, kd = real["fd_name"], real["kd_name"]
            o = real["overall"]
            doc.p(f"Realism in the judge's feature space against its training tiles ({which}): {fd} "
                  f"{fmt(o.get(fd), 4)}, {kd} {fmt(o.get(kd), 5)}, precision {fmt(o.get('precision'))}, recall "
                  f"{fmt(o.get('recall'))}, coverage {fmt(o.get('coverage'))}.")
