"""Benchmark host memory: peak RSS of loading an SDXL checkpoint (fp32, fp16), of merging a LoRA into it, of one
inference step with the LoRA merged, and of one LoRA training step with and without gradient checkpointing.

    python bench/bench_memory.py                          # SDXL base size: ~20 GB free RAM, ~7 GB temp disk
    python bench/bench_memory.py --config bench_medium    # the same runs on the 138M-parameter UNet, ~3 min
    python bench/bench_memory.py --config bench_medium --only train --train_resolution 512
    python bench/bench_memory.py --only inference --inference_resolution 1024

A first child process gives models of the config's size random fp16 weights and writes them as a temporary fp16
single-file checkpoint (with the project's own saver), plus a LoRA on every module (Dense and conv, rank
`--network_dim`, nonzero lora_up). Then every measurement runs in a fresh child, because peak RSS (ru_maxrss) is
per process and never goes down: load in fp32, load in fp16, load in fp32 + merge the LoRA, and
sdxl_minimal_inference.py's pipeline (load, merge, compile the guided UNet) drawing one image with one sampling
step at `--inference_resolution`; then one training step (compile + step) of the trainer's own step cell on
random-weight models, without and with `--gradient_checkpointing` (static shapes, cached latents and text-encoder
outputs, `--train_resolution`, `--train_batch_size`). Each child reports its peak right after importing mindspore
and the project (the baseline) and at the end. Nothing is kept unless `--workdir` names a folder. The JSON layout
is documented in bench/README.md.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before mindspore, as the trainer does: see DESIGN.md
os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings would drown the report
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

import bench_train  # noqa: E402  (this script's folder: the training-step rows build what it times)
from library import sdxl_model_util  # noqa: E402
from networks import lora  # noqa: E402

SCHEMA_VERSION = 1
MB = 1024 * 1024
LOAD_MEASUREMENTS = ("load_fp32", "load_fp16", "merge_lora_fp32")
INFERENCE_MEASUREMENTS = ("inference_step",)
TRAIN_MEASUREMENTS = ("train_step", "train_step_checkpointing")
MEASUREMENTS = LOAD_MEASUREMENTS + INFERENCE_MEASUREMENTS + TRAIN_MEASUREMENTS
CHECKPOINT, LORA_FILE = "random_sdxl_fp16.safetensors", "all_modules_lora.safetensors"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sdxl_base", help="model config name in configs/ or a JSON path")
    parser.add_argument("--network_dim", type=int, default=4, help="rank of the merged LoRA (alpha = dim / 2)")
    parser.add_argument("--workdir", default=None,
                        help="folder for the checkpoint and LoRA (kept, and reused when present); default: a "
                             "temporary folder, removed at the end")
    parser.add_argument("--train_resolution", type=int, default=128, help="image side of the training-step rows")
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--inference_resolution", type=int, default=1024,
                        help="image side of the inference row (SDXL's 1024 by default)")
    parser.add_argument("--only", choices=("load", "inference", "train"), default=None,
                        help="run only the load/merge rows, the inference row or the training-step rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench/results_memory.json")
    parser.add_argument("--child", choices=("write",) + MEASUREMENTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def count_params(models) -> int:
    return sum(int(np.prod(p.shape)) for model in models for p in model.get_parameters())


def write_inputs(args, config):
    """Random fp16 weights straight into models built without data (no fp32 copy), saved; then the LoRA."""
    rng = np.random.default_rng(args.seed)
    models = sdxl_model_util.build_models(config, allocate=False)
    for model in models:
        for param in model.get_parameters():
            value = (rng.standard_normal(param.shape, dtype=np.float32) * 0.02).astype(np.float16)
            sdxl_model_util.assign_parameter(param, value, ms.float16)
    params = count_params(models)  # before the LoRA adds its own
    te1, te2, vae, unet = models
    metadata = {sdxl_model_util.CONFIG_METADATA_KEY: json.dumps(config)}
    sdxl_model_util.save_stable_diffusion_checkpoint(os.path.join(args.workdir, CHECKPOINT), te1, te2, unet, vae,
                                                     logit_scale=np.float16(4.6), metadata=metadata)
    network = lora.create_network(1.0, args.network_dim, args.network_dim / 2, vae, [te1, te2], unet,
                                  conv_dim=args.network_dim, conv_alpha=args.network_dim / 2)
    for module in network.loras:
        up = module.lora_up.weight
        up.set_data(ms.Tensor(rng.standard_normal(up.shape).astype(np.float32) * 0.01, up.dtype))
    network.save_weights(os.path.join(args.workdir, LORA_FILE))
    return {"params": params, "lora_modules": len(network.loras)}


def train_step_once(args, config, gradient_checkpointing: bool) -> dict:
    """Build the trainer's step on random-weight models (dim `--network_dim` LoRA, AdamW), compile it and run one
    step: what bench/bench_train.py measures, in this process."""
    bench_args = bench_train.parse_args(
        ["--config", args.config, "--resolution", str(args.train_resolution), "--batch_size",
         str(args.train_batch_size), "--network_dim", str(args.network_dim), "--seed", str(args.seed),
         "--static_shapes"] + (["--gradient_checkpointing"] if gradient_checkpointing else []))
    targs = bench_train.trainer_args(bench_args, None)
    bench_train.train_network.configure_mindspore(targs)
    bench_train.train_network.set_seed(args.seed)
    train_step, _ = bench_train.build_train_step(config, targs)
    results = {"peak_rss_mb_after_build": peak_rss_mb()}
    rng = np.random.default_rng(args.seed)
    batch = tuple(ms.Tensor(a) for a in bench_train.make_batch(config, bench_args, rng))
    noise = tuple(ms.Tensor(a) for a in bench_train.NoiseSampler(targs, seed=args.seed).draw(batch[0].shape))
    start = time.perf_counter()
    train_step.compile(*batch, *noise)
    results["compile_s"] = time.perf_counter() - start
    results["peak_rss_mb_after_compile"] = peak_rss_mb()
    start = time.perf_counter()
    results["loss"] = float(train_step(*batch, *noise)[1].asnumpy())
    results["step_s"] = time.perf_counter() - start
    return results


def inference_step_once(args) -> dict:
    """sdxl_minimal_inference.py's one-image run in fp32 with the LoRA merged and the script's default --mode, with
    one sampling step (a compile of the guided UNet where that mode compiles, one UNet call on the [negative,
    positive] batch, the VAE decode; each model freed once its part is done, as the script does)."""
    import sdxl_minimal_inference

    sdxl_minimal_inference.use_synchronous_pynative()
    start = time.perf_counter()
    pipeline = sdxl_minimal_inference.SdxlPipeline(
        os.path.join(args.workdir, CHECKPOINT), [sdxl_minimal_inference.LoraWeight(
            os.path.join(args.workdir, LORA_FILE), 1.0)], dtype="fp32")
    results = {"setup_s": time.perf_counter() - start, "peak_rss_mb_after_setup": peak_rss_mb(),
               "mode": "graph" if pipeline.graph_mode else "pynative"}
    start = time.perf_counter()
    size = (args.inference_resolution, args.inference_resolution)
    image = pipeline.generate(prompt="a photo of a cat", target_size=size, steps=1, seed=args.seed, progress=False,
                              release_models=True)
    results["generate_s"] = time.perf_counter() - start  # the compile included
    results["image_shape"] = list(image.shape)
    return results


def measure(args, task, config) -> dict:
    """One task in this (fresh) process; peak RSS from right after the imports to the end."""
    baseline = peak_rss_mb()
    start = time.perf_counter()
    results = {}
    if task == "write":
        results.update(write_inputs(args, config))
    elif task in TRAIN_MEASUREMENTS:
        results.update(train_step_once(args, config, gradient_checkpointing=task == "train_step_checkpointing"))
    elif task in INFERENCE_MEASUREMENTS:
        results.update(inference_step_once(args))
    else:
        dtype = ms.float16 if task == "load_fp16" else ms.float32
        te1, te2, vae, unet, _, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(
            os.path.join(args.workdir, CHECKPOINT), dtype=dtype)
        results["models_mb"] = count_params((te1, te2, vae, unet)) * (2 if dtype == ms.float16 else 4) / MB
        if task == "merge_lora_fp32":
            results["load_s"] = time.perf_counter() - start
            results["peak_rss_mb_after_load"] = peak_rss_mb()
            merger, weights_sd = lora.create_network_from_weights(
                1.0, os.path.join(args.workdir, LORA_FILE), vae, [te1, te2], unet, for_inference=True)
            merger.merge_to(weights_sd)
            results["merged_modules"] = len(merger.targets)
            # the largest fp32 delta: what merging one module at a time may add on top of the models
            largest = max(int(np.prod(layer.weight.shape)) for layer in merger.targets.values())
            results["largest_delta_mb"] = largest * 4 / MB
    results["seconds"] = time.perf_counter() - start
    results["baseline_rss_mb"] = baseline
    results["peak_rss_mb"] = peak_rss_mb()
    results["peak_over_baseline_mb"] = results["peak_rss_mb"] - baseline
    if "models_mb" in results:
        results["peak_over_baseline_and_models_mb"] = results["peak_over_baseline_mb"] - results["models_mb"]
    return results


def run_child(args, task) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", task, "--config", args.config,
           "--network_dim", str(args.network_dim), "--workdir", args.workdir, "--seed", str(args.seed),
           "--train_resolution", str(args.train_resolution), "--train_batch_size", str(args.train_batch_size),
           "--inference_resolution", str(args.inference_resolution)]
    print("running:", task, flush=True)
    child = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if child.returncode != 0:
        # recorded, not raised: the other measurements still run (a child killed for memory is a result too)
        print(child.stderr[-4000:], file=sys.stderr)
        lines = child.stderr.strip().splitlines()
        return {"name": task, "error": lines[-1] if lines else f"exit status {child.returncode}"}
    return {"name": task, "results": json.loads(child.stdout.strip().splitlines()[-1])}


def memory_info() -> dict:
    """MemTotal / MemAvailable from /proc/meminfo in MB (Linux), or {} elsewhere."""
    info = {}
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key in ("MemTotal", "MemAvailable"):
                    info[key] = int(value.split()[0]) / 1024
    return {"mem_total_mb": info.get("MemTotal"), "mem_available_mb_at_start": info.get("MemAvailable")}


def environment():
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_target": ms.get_context("device_target"),
        "mindspore_version": ms.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        **memory_info(),
    }


def run_all(args) -> dict:
    """The write child (unless the workdir has its files already), then each measurement's child."""
    report = {"schema_version": SCHEMA_VERSION, "environment": environment(),
              "settings": {"config": args.config, "network_dim": args.network_dim, "seed": args.seed,
                           "checkpoint_dtype": "float16", "train_resolution": args.train_resolution,
                           "train_batch_size": args.train_batch_size,
                           "inference_resolution": args.inference_resolution},
              "runs": []}
    if args.only != "train":
        if not all(os.path.exists(os.path.join(args.workdir, name)) for name in (CHECKPOINT, LORA_FILE)):
            report["runs"].append(run_child(args, "write"))
            if "error" in report["runs"][-1]:
                return report
    groups = {"load": LOAD_MEASUREMENTS, "inference": INFERENCE_MEASUREMENTS, "train": TRAIN_MEASUREMENTS}
    for group, tasks in groups.items():
        if args.only in (None, group):
            report["runs"] += [run_child(args, task) for task in tasks]
    return report


def main(argv=None):
    args = parse_args(argv)
    config = sdxl_model_util.load_model_config(args.config)
    if args.child:
        print(json.dumps(measure(args, args.child, config)))
        return
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        report = run_all(args)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
            args.workdir = tmp
            report = run_all(args)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    for run in report["runs"]:
        if "error" in run:
            print(f"{run['name']}: FAILED: {run['error']}")
            continue
        r = run["results"]
        models = f", models {r['models_mb'] / 1024:.2f} GB" if "models_mb" in r else ""
        print(f"{run['name']}: peak RSS {r['peak_rss_mb'] / 1024:.2f} GB (baseline {r['baseline_rss_mb'] / 1024:.2f} GB"
              f"{models}), {r['seconds']:.1f} s")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
