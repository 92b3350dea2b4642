#!/usr/bin/env bash
# The main job on a fresh machine: install, write a tiny random SDXL checkpoint, train a LoRA on the
# bundled tiny data set, and generate an image with it. Everything runs offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
OUT=${DEMO_OUT:-demo_out}
mkdir -p "$OUT"
.venv/bin/python tools/make_tiny_checkpoint.py --output "$OUT/tiny_sdxl.safetensors"
