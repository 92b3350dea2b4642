"""Benchmark the graph-mode SDXL LoRA train step: compile time, seconds per step, peak memory.

    python bench/bench_train.py --config tiny_sdxl --batch_size 1 --resolution 64 --steps 10
    python bench/bench_train.py --config tiny_sdxl bench_medium --resolution 128 --cache_comparison

Models are built from a config with random weights (no checkpoint needed). The step is the trainer's own
`TrainStepForSDXLLoRA` with a dim-8 LoRA and AdamW. By default latents and text-encoder outputs come in as
cached inputs, so the UNet + LoRA step is timed; `--with_text_encoders` feeds token ids and trains the text
encoders' LoRA too. One measurement runs in this process; several configs or `--cache_comparison` run each
measurement in a fresh child process (peak RSS is per process, and a warm compile cache needs a new process).
The JSON layout is documented in bench/README.md.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before mindspore, as the trainer does: see DESIGN.md
os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings would drown the report
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

import sdxl_train_network  # noqa: E402
import train_network  # noqa: E402
from library import optimizers, sdxl_model_util  # noqa: E402
from library.custom_train_functions import DiffusionNoiseAndLoss  # noqa: E402
from library.graph_compile import CompiledStep  # noqa: E402
from library.noise_sampling import NoiseSampler  # noqa: E402
from library.sdxl_tokenize import SdxlTokenizeStrategy  # noqa: E402
from networks import lora  # noqa: E402

SCHEMA_VERSION = 1
MB = 1024 * 1024


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=["tiny_sdxl"],
                        help="model config name(s) in configs/ or JSON path(s)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=64, help="square image side in pixels (latents are 1/8)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) call")
    parser.add_argument("--network_dim", type=int, default=8)
    parser.add_argument("--with_text_encoders", action="store_true",
                        help="feed token ids and train text-encoder LoRA too (default: cached TE outputs, UNet only)")
    parser.add_argument("--compile_cache_dir", default=None,
                        help="MindSpore compile cache root; each config caches under <root>/<config name>")
    parser.add_argument("--cache_comparison", action="store_true",
                        help="run twice in fresh processes with one compile cache dir (a temporary one unless "
                             "--compile_cache_dir names an empty or new folder) and report both first-call times")
    parser.add_argument("--static_shapes", action="store_true",
                        help="compile per input shape, as the trainer's --static_shapes (default: one dynamic-shape graph)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute the UNet blocks in backward")
    parser.add_argument("--second_resolution", type=int, default=None,
                        help="after the timed steps, run steps at this resolution too (a second bucket): shows whether "
                             "it compiles again")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench/results.json")
    return parser.parse_args(argv)


def trainer_args(args, compile_cache_dir):
    """The trainer's own argument namespace for this benchmark (defaults as a Kohya user gets them)."""
    flags = [
        "--network_module", "networks.lora", "--network_dim", str(args.network_dim), "--network_alpha", "1",
        "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--seed", str(args.seed), "--cache_latents",
    ]
    if not args.with_text_encoders:
        flags += ["--network_train_unet_only", "--cache_text_encoder_outputs"]
    if compile_cache_dir:
        flags += ["--compile_cache_dir", compile_cache_dir]
    if args.gradient_checkpointing:
        flags.append("--gradient_checkpointing")
    return sdxl_train_network.setup_parser().parse_args(flags)


def build_train_step(config, targs):
    """(train_step, optimizer): random-weight models, LoRA placed in them, AdamW, the trainer's step cell."""
    te1, te2, vae, unet = sdxl_model_util.build_models(config)
    network = lora.create_network(1.0, targs.network_dim, targs.network_alpha, None, [te1, te2], unet)
    train_text_encoder = not targs.network_train_unet_only
    network.apply_to([te1, te2], unet, train_text_encoder, True)
    if targs.gradient_checkpointing:
        unet.set_gradient_checkpointing(True)
    param_groups, _ = network.prepare_optimizer_params(targs.text_encoder_lr, targs.unet_lr, targs.learning_rate)
    _, _, optimizer = optimizers.get_optimizer(targs, param_groups)
    step = sdxl_train_network.TrainStepForSDXLLoRA(
        network, optimizer, unet, (te1, te2), None, DiffusionNoiseAndLoss.from_args(targs),
        latents_cached=True,
        text_encoder_outputs_cached=not train_text_encoder,
        train_text_encoder=train_text_encoder,
        weight_dtype=ms.float32,
        vae_dtype=ms.float32,
        vae_scale_factor=sdxl_train_network.SdxlNetworkTrainer.vae_scale_factor,
        max_grad_norm=targs.max_grad_norm or None,
    )
    step.set_train(True)
    return step, optimizer


def make_batch(config, args, rng):
    """One batch tuple as library.datasets yields it with cached latents (and cached TE outputs by default)."""
    b, side = args.batch_size, args.resolution
    latents = rng.standard_normal((b, 4, side // 8, side // 8), dtype=np.float32)
    if args.with_text_encoders:
        ids1, ids2 = SdxlTokenizeStrategy().tokenize(["a photo of a cat sitting on a chair"] * b)
        text = (ids1, ids2)
    else:
        te1, te2 = config["text_encoder_1"], config["text_encoder_2"]
        text = (
            rng.standard_normal((b, 77, te1["hidden_size"]), dtype=np.float32),
            rng.standard_normal((b, 77, te2["hidden_size"]), dtype=np.float32),
            rng.standard_normal((b, te2["projection_dim"]), dtype=np.float32),
        )
    sizes_hw = np.full((b, 2), side, dtype=np.int32)
    return (latents, *text, np.ones(b, np.float32), sizes_hw, np.zeros((b, 2), np.int32), sizes_hw)


def peak_rss_mb():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def device_memory_mb():
    """MindSpore's device memory pool peaks; None where the runtime keeps no pool (CPU reports 0)."""
    reserved = ms.runtime.max_memory_reserved()
    if not reserved:
        return None
    return {"max_allocated_mb": ms.runtime.max_memory_allocated() / MB, "max_reserved_mb": reserved / MB}


def measure(args):
    """One measurement in this process -> a run record."""
    load_start = os.getloadavg()
    config_name = args.config[0]
    config = sdxl_model_util.load_model_config(config_name)
    # one cache folder per config, so that several configs can share a root
    cache_dir = args.compile_cache_dir and os.path.join(args.compile_cache_dir, Path(config_name).stem)
    targs = trainer_args(args, cache_dir)
    train_network.configure_mindspore(targs)  # graph mode, and the compile cache when asked
    train_network.set_seed(args.seed)

    start = time.perf_counter()
    train_step, optimizer = build_train_step(config, targs)
    build_s = time.perf_counter() - start
    rss_after_build = peak_rss_mb()

    rng = np.random.default_rng(args.seed)
    batch = tuple(ms.Tensor(a) for a in make_batch(config, args, rng))
    noise_sampler = NoiseSampler(targs, seed=args.seed)
    latent_shape = batch[0].shape
    # the trainer's way of calling the step: dynamic shapes (or --static_shapes) and the compile cache
    compiled_step = CompiledStep(train_step, (True,) * len(batch) + noise_sampler.per_sample,
                                 static_shapes=args.static_shapes, compile_cache_dir=cache_dir)

    def run_step():
        noise = tuple(ms.Tensor(a) for a in noise_sampler.draw(batch[0].shape))
        start = time.perf_counter()
        loss = compiled_step(*batch, *noise)[1]
        loss = float(loss.asnumpy())  # waits for the device: asynchronous backends return before finishing
        return time.perf_counter() - start, loss

    first_call_s, first_loss = run_step()
    for _ in range(args.warmup):
        run_step()
    step_times, last_loss = [], first_loss
    for _ in range(args.steps):
        seconds, last_loss = run_step()
        step_times.append(seconds)
    step_median = statistics.median(step_times)
    second_shape = None
    if args.second_resolution:
        first_resolution, args.resolution = args.resolution, args.second_resolution
        batch = tuple(ms.Tensor(a) for a in make_batch(config, args, rng))
        args.resolution = first_resolution
        times = [run_step()[0] for _ in range(1 + args.warmup + min(args.steps, 3))]
        second_shape = {"resolution": args.second_resolution, "first_call_s": times[0],
                        "step_s_median": statistics.median(times[1 + args.warmup:])}

    return {
        "config": config_name,
        "settings": {
            "batch_size": args.batch_size,
            "resolution": args.resolution,
            "latent_hw": list(latent_shape[2:]),
            "steps": args.steps,
            "warmup": args.warmup,
            "network_dim": args.network_dim,
            "with_text_encoders": args.with_text_encoders,
            "optimizer": "AdamW",
            "max_grad_norm": targs.max_grad_norm,
            "compile_cache_dir": cache_dir,
            "static_shapes": args.static_shapes,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "model": {
            "unet_params_incl_lora": sum(p.size for p in train_step.unet.get_parameters()),
            "trainable_params": sum(p.size for p in optimizer.parameters),
        },
        "results": {
            "build_s": build_s,
            "first_call_s": first_call_s,
            "compile_s": first_call_s - step_median,
            "step_s_median": step_median,
            "step_s_min": min(step_times),
            "step_s_max": max(step_times),
            "step_times_s": step_times,
            "peak_rss_mb_after_build": rss_after_build,
            "peak_rss_mb": peak_rss_mb(),
            "device_memory": device_memory_mb(),
            "loss_first": first_loss,
            "loss_last": last_loss,
            "second_shape": second_shape,
            "num_compiles": compiled_step.num_compiles,
        },
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
    }


def measure_in_child(args, config_name, compile_cache_dir):
    """The same measurement in a fresh process: its own peak RSS, and an in-memory-cold compile."""
    with tempfile.TemporaryDirectory() as tmp:
        output = os.path.join(tmp, "run.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--config", config_name,
               "--batch_size", str(args.batch_size), "--resolution", str(args.resolution),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--network_dim", str(args.network_dim),
               "--seed", str(args.seed), "--output", output]
        if args.with_text_encoders:
            cmd.append("--with_text_encoders")
        if args.static_shapes:
            cmd.append("--static_shapes")
        if args.gradient_checkpointing:
            cmd.append("--gradient_checkpointing")
        if args.second_resolution:
            cmd += ["--second_resolution", str(args.second_resolution)]
        if compile_cache_dir:
            cmd += ["--compile_cache_dir", compile_cache_dir]
        print("running:", " ".join(cmd), flush=True)
        child = subprocess.run(cmd, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
        if child.returncode != 0:
            # recorded, not raised: a failing warm-cache run is itself a result worth reporting
            print(child.stderr[-4000:], file=sys.stderr)
            errors = [line for line in child.stderr.splitlines() if re.match(r"\w+(Error|Exception)\b", line)]
            return {"config": config_name, "error": errors[-1] if errors else f"exit status {child.returncode}",
                    "compile_cache_dir": compile_cache_dir and os.path.join(compile_cache_dir, Path(config_name).stem)}
        with open(output, encoding="utf-8") as f:
            return json.load(f)["runs"][0]


def cache_comparison(args, config_name):
    """Two fresh processes sharing one compile cache dir: the first fills it, the second should load from it."""
    cache_dir = args.compile_cache_dir
    config_cache = cache_dir and os.path.join(cache_dir, Path(config_name).stem)
    if config_cache and os.path.isdir(config_cache) and os.listdir(config_cache):
        raise SystemExit(f"--cache_comparison: {config_cache} is not empty, so the first run would not be cold")
    own_dir = cache_dir is None
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="ms_compile_cache_")
    try:
        cold = measure_in_child(args, config_name, cache_dir)
        warm = measure_in_child(args, config_name, cache_dir)
    finally:
        if own_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    summary = {"config": config_name}
    for name, run in (("cold", cold), ("warm", warm)):
        summary[f"{name}_first_call_s"] = run["results"]["first_call_s"] if "results" in run else None
        summary[f"{name}_error"] = run.get("error")
    both = summary["cold_first_call_s"] and summary["warm_first_call_s"]
    summary["speedup"] = summary["cold_first_call_s"] / summary["warm_first_call_s"] if both else None
    return [cold, warm], summary


def environment():
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_target": ms.get_context("device_target"),
        "mindspore_version": ms.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def main(argv=None):
    args = parse_args(argv)
    report = {"schema_version": SCHEMA_VERSION, "environment": environment(), "runs": []}
    if args.cache_comparison:
        report["cache_comparison"] = []
        for name in args.config:
            runs, summary = cache_comparison(args, name)
            report["runs"] += runs
            report["cache_comparison"].append(summary)
    elif len(args.config) > 1:
        report["runs"] = [measure_in_child(args, name, args.compile_cache_dir) for name in args.config]
    else:
        report["runs"] = [measure(args)]

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    for run in report["runs"]:
        if "error" in run:
            print(f"{run['config']}: FAILED (cache dir: {run['compile_cache_dir']}): {run['error']}")
            continue
        r = run["results"]
        second = r["second_shape"]
        second = f", second shape: first call {second['first_call_s']:.1f} s, {second['step_s_median']:.3f} s/step" if second else ""
        print(f"{run['config']}: first call {r['first_call_s']:.1f} s, {r['step_s_median']:.3f} s/step, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, {r['num_compiles']} compile(s){second} "
              f"(cache dir: {run['settings']['compile_cache_dir']})")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
