#!/usr/bin/env bash
# Regenerates the README's analysis figures in docs/figures/ from the embedded digits model (and a
# randomly initialised, seeded ViT-S/32 for the photo examples). Most of the time is fig5's 24 noises (its
# synth_seconds in docs/figures/fig5_properties.json); the trend's finetune is a 10-round digits run.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin/nsvit-fast
F=docs/figures
T=$(mktemp -d)  # the trend's run and the fingerprint: a fresh folder each time, so the script reruns
$B analyze fig3 --out $F
$B analyze fig5 --out $F
$B watermark --image skimage:coffee --out $F/watermark_digits.png
$B watermark --model vit_small_patch32_224 --image skimage:astronaut --strength 0.6 --out $F/watermark_vits32.png
$B targeted --source skimage:astronaut --target skimage:chelsea --out $F/targeted_digits.png
$B targeted --model vit_small_patch32_224 --source skimage:astronaut --target skimage:chelsea --out $F/targeted_vits32.png
$B finetune --config digits --out $T/trend --quiet
$B analyze trend --run $T/trend --out $F
$B fingerprint make --fingerprint $T/fp.safetensors --report $F
rm -rf "$T"
# The ROC over a population of digits models (see the README's Fingerprinting section) writes bench/results/fingerprint.*
# .venv/bin/python bench/fingerprint_roc.py
