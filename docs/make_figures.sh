#!/usr/bin/env bash
# Regenerates the README's analysis figures in docs/figures/ from the embedded digits model (and a
# randomly initialised, seeded ViT-S/32 for the photo examples). About 8 minutes on 2 CPU cores with the trend's finetune.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin/nsvit-fast
F=docs/figures
$B analyze fig3 --out $F
$B analyze fig5 --out $F
$B watermark --image skimage:coffee --out $F/watermark_digits.png
$B watermark --model vit_small_patch32_224 --image skimage:astronaut --strength 0.6 --out $F/watermark_vits32.png
$B targeted --source skimage:astronaut --target skimage:chelsea --out $F/targeted_digits.png
$B targeted --model vit_small_patch32_224 --source skimage:astronaut --target skimage:chelsea --out $F/targeted_vits32.png
$B finetune --config digits --out /tmp/nsvit_trend --quiet
$B analyze trend --run /tmp/nsvit_trend --out $F
$B fingerprint make --fingerprint /tmp/nsvit_fp.safetensors --report $F
# The ROC over a population of digits models (about 6 minutes) writes bench/results/fingerprint.*
# .venv/bin/python bench/fingerprint_roc.py
