#!/usr/bin/env bash
# The recipe of the shipped base histodiffusion-base-64 (issue 11): three unlabeled H&E sets prepared at the
# target's scale (LC25000 tiles shrunk 224 -> 64 px; nuclei ~5 px), a KL autoencoder (f=4, 8 latent
# channels), an unconditional UNet on 8x16x16 latents, exported as a checksummed fp16 base.
#
#   bash recipes/base-64.sh [OUT]            # OUT defaults to runs/base-64; re-run the same command to resume
#
# Environment: SHARED (default ../shared/data beside the checkout), HISTODIFFUSION (the command, default
# `histodiffusion`), AE_STEPS / LDM_STEPS (training lengths), AE_FLAGS / LDM_FLAGS (extra flags, e.g. wider
# models on GPUs). Every stage resumes from its last checkpoint; raising AE_STEPS or LDM_STEPS continues a
# finished stage. BASE_FROM=PATH continues an existing base instead (its autoencoder encodes the corpus, its
# EMA UNet is where pretraining starts, for LDM_STEPS more steps with a fresh optimizer; LDM_STEPS=0 keeps its UNet).
# DECODER_STEPS=N trains the decoder alone N steps longer on whole tiles (train-autoencoder --train-part decoder;
# export-base --vae takes it). Two candidates were measured and not shipped (BENCHMARKS.md): a longer UNet,
#   BASE_FROM=src/histodiffusion/base/histodiffusion-base-64 LDM_STEPS=3000 VERSION=2 \
#   LDM_FLAGS="--lr 1e-4 --warmup 100" bash recipes/base-64.sh runs/base-64-v2
# and a longer decoder on whole tiles (sharper, no borders, reconstruction ceiling 72% vs 45%, samples no more realistic),
#   BASE_FROM=src/histodiffusion/base/histodiffusion-base-64 LDM_STEPS=0 DECODER_STEPS=1000 VERSION=2 \
#   bash recipes/base-64.sh runs/base-64-dec
# The held-out groups (--holdout-frac) are never trained on: bench/ae_fidelity.py and
# bench/base_realism.py measure on them.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$here/../shared/data}
OUT=${1:-runs/base-64}
HD=${HISTODIFFUSION:-histodiffusion}
AE_STEPS=${AE_STEPS:-4000}
LDM_STEPS=${LDM_STEPS:-6000}
DECODER_STEPS=${DECODER_STEPS:-0}
VERSION=${VERSION:-1}
BASE_FROM=${BASE_FROM:-}
for d in unlabeled_lc25000_colon unlabeled_osteosarcoma_ut unlabeled_he; do
  [ -d "$SHARED/$d" ] || { echo "recipe: missing $SHARED/$d (set SHARED=/path/to/shared/data)" >&2; exit 2; }
done

# 1. the corpus at the target's scale: 224 source px -> 64 px tiles; a held-out slice of each by group
$HD prepare --sources "$SHARED/unlabeled_lc25000_colon" --patch-size 224 --tile-size 64 --min-tissue 0.25 \
            --holdout-frac 0.05 --out "$OUT/data/colon"
$HD prepare --sources "$SHARED/unlabeled_osteosarcoma_ut" --patch-size 224 --stride 112 --tile-size 64 \
            --holdout-frac 0.1 --out "$OUT/data/osteo"
$HD prepare --sources "$SHARED/unlabeled_he" --patch-size 224 --stride 112 --group-px 672 --tile-size 64 \
            --holdout-frac 0.1 --out "$OUT/data/he"
data="$OUT/data/colon,$OUT/data/osteo,$OUT/data/he"

# 2. the autoencoder (random 32 px crops of the 64 px tiles, random dihedral transforms), or BASE_FROM's
if [ -n "$BASE_FROM" ]; then
  vae="$BASE_FROM/vae"; init=(--init-from "$BASE_FROM")
else
  $HD train-autoencoder --data "$data" --latent-channels 8 --steps "$AE_STEPS" --batch-size 16 --crop 32 \
                        --eval-every 500 --checkpoint-every 250 --holdout 192 ${AE_FLAGS:-} --out "$OUT/ae"
  vae="$OUT/ae/model/vae"; init=()
fi

if [ -n "$BASE_FROM" ] && [ "$LDM_STEPS" = 0 ]; then
  model="$BASE_FROM"  # only the decoder below changes
else
  # 3. latents of every tile and its 7 dihedral variants (the encoder is not rotation-equivariant)
  for d in colon osteo he; do
    $HD encode --data "$OUT/data/$d" --vae "$vae" --flips true --out "$OUT/cache/$d"
  done

  # 4. the unconditional UNet on the weighted mixture (colon: same lab and stain as the LC25000 target)
  $HD pretrain --cache "$OUT/cache/colon,$OUT/cache/osteo,$OUT/cache/he" --weights 0.5,0.35,0.15 \
               --steps "$LDM_STEPS" --batch-size 32 --warmup 200 --sample-every 1000 --checkpoint-every 250 \
               "${init[@]}" ${LDM_FLAGS:-} --out "$OUT/ldm"
  model="$OUT/ldm/model"
fi

# 5. optionally the decoder alone, longer, on whole 64 px tiles (the autoencoder trained on 32 px crops):
#    encoder, latents, scaling factor and so the UNet stay valid
vae_flag=()
if [ "$DECODER_STEPS" -gt 0 ]; then
  $HD train-autoencoder --data "$data" --init-from "$model" --train-part decoder --latent-channels 8 --crop 0 \
                        --steps "$DECODER_STEPS" --batch-size 16 --lr 1e-4 --eval-every 250 --checkpoint-every 250 \
                        --holdout 192 ${AE_FLAGS:-} --out "$OUT/ae_decoder"
  vae_flag=(--vae "$OUT/ae_decoder/model/vae")
fi

# 6. the shippable base: fp16 safetensors, checksums, model card (+ the measurements in the card notes)
$HD export-base --model "$model" "${vae_flag[@]}" --data "$data" --version "$VERSION" \
                --card-notes "$here/recipes/base-64-card.md" --out "$OUT/histodiffusion-base-64"
echo "base written to $OUT/histodiffusion-base-64"
