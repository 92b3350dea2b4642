#!/usr/bin/env bash
# The main job on a fresh machine: install, write a tiny random SDXL checkpoint, train a LoRA on the
# bundled tiny data set with Kohya's command line, and generate an image with it. Offline, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
PY=.venv/bin/python
# configs/demo_train.toml and configs/demo_dataset.toml refer to demo_out/
rm -rf demo_out/lora demo_out/images
$PY tools/make_tiny_checkpoint.py --output demo_out/tiny_sdxl.safetensors
$PY tools/make_demo_dataset.py --output_dir demo_out/dataset/images
$PY sdxl_train_network.py --config_file configs/demo_train.toml
$PY networks/check_lora_weights.py demo_out/lora/demo_lora.safetensors | sed -n "1,6p"
$PY sdxl_minimal_inference.py --ckpt_path demo_out/tiny_sdxl.safetensors \
    --lora_weights "demo_out/lora/demo_lora.safetensors;1.0" --prompt "sks shape, a red circle" \
    --target_height 64 --target_width 96 --steps 12 --seed 1 --mode pynative --output_dir demo_out/images
echo "LoRA: demo_out/lora/demo_lora.safetensors"
echo "image: $(ls demo_out/images/*.png)"
