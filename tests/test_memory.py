"""Peak memory of loading a checkpoint and merging a LoRA (bench_medium models, each measured in a fresh process).

Peak RSS (ru_maxrss) is per process and only grows, so every measurement runs in its own child. The child's
baseline is its peak right after importing mindspore and the project modules; the bound on top of it is the
models' size in the target dtype (plus, for a merge, the largest module's fp32 delta) and a margin of MARGIN
times the models' size. Before loading streamed, the loader went about 730 MB (fp16) and 420 MB (fp32) over the
models and the merger held every module's delta at once: far outside these bounds.
"""

import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from library import sdxl_model_util
from networks import lora

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1024 * 1024
MARGIN = 0.25  # of the models' size: a read window, a tensor or two in flight, allocator slack
MULTIPLIER = 0.8
NETWORK_DIM, NETWORK_ALPHA = 4, 2.0

# settings come as one JSON argument: task ("load", "merge" or "free": load, then drop the models), ckpt, dtype, and
# for "merge": lora_file, multiplier, names (LoRA modules whose merged weights go to `out`, an .npz file)
CHILD = r"""
import json, resource, sys
import mindspore as ms
import numpy as np
from library import sdxl_model_util
from networks import lora


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20


settings = json.loads(sys.argv[1])
config = sdxl_model_util.load_model_config("bench_medium")
baseline_mb = peak_mb()
if settings["task"] == "free":
    import gc
    gc.collect()
    baseline_rss_mb = current_rss_mb()
te1, te2, vae, unet, _, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(
    settings["ckpt"], getattr(ms, settings["dtype"]), config)
dtypes = sorted({str(p.dtype) for model in (te1, te2, vae, unet) for p in model.get_parameters()})
if settings["task"] == "merge":
    merger, weights_sd = lora.create_network_from_weights(
        settings["multiplier"], settings["lora_file"], vae, [te1, te2], unet, for_inference=True)
    merger.merge_to(weights_sd)
    np.savez(settings["out"], **{name: merger.targets[name].weight.asnumpy() for name in settings["names"]})
result = {"baseline_mb": baseline_mb, "peak_mb": peak_mb(), "dtypes": dtypes}
if settings["task"] == "free":
    from library import host_memory
    result["loaded_rss_mb"] = current_rss_mb()
    del te1, te2, vae, unet
    host_memory.free_unreferenced_memory()
    result["freed_rss_mb"] = current_rss_mb()
    result["baseline_rss_mb"] = baseline_rss_mb
print(json.dumps(result))
"""


def run_child(**settings) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """bench_medium models with random weights saved as fp16 and fp32 checkpoints, and a LoRA on every module."""
    root = tmp_path_factory.mktemp("memory")
    config = sdxl_model_util.load_model_config("bench_medium")
    ms.set_seed(0)
    te1, te2, vae, unet = sdxl_model_util.build_models(config)
    params = sum(int(np.prod(p.shape)) for model in (te1, te2, vae, unet) for p in model.get_parameters())
    ckpts = {}
    for name, save_dtype in (("float16", np.float16), ("float32", np.float32)):
        ckpts[name] = str(root / f"medium_{name}.safetensors")
        sdxl_model_util.save_stable_diffusion_checkpoint(ckpts[name], te1, te2, unet, vae, 4.6, save_dtype=save_dtype)

    # after saving: the network wraps the models' layers in place
    network = lora.create_network(1.0, NETWORK_DIM, NETWORK_ALPHA, vae, [te1, te2], unet, conv_dim=NETWORK_DIM,
                                  conv_alpha=NETWORK_ALPHA)
    rng = np.random.default_rng(0)
    for module in network.loras:
        up = module.lora_up.weight
        up.set_data(ms.Tensor(rng.standard_normal(up.shape).astype(np.float32) * 0.1))
    lora_file = str(root / "all_modules.safetensors")
    network.save_weights(lora_file)
    return {"root": root, "ckpts": ckpts, "params": params, "models": (te1, te2, vae, unet), "network": network,
            "lora_file": lora_file}


@pytest.mark.parametrize("dtype, itemsize", [("float16", 2), ("float32", 4)])
def test_loading_peaks_at_the_models_in_their_dtype(medium, dtype, itemsize):
    models_mb = medium["params"] * itemsize / MB
    run = run_child(task="load", ckpt=medium["ckpts"]["float16"], dtype=dtype)
    assert run["dtypes"] == [dtype.capitalize()]
    extra_mb = run["peak_mb"] - run["baseline_mb"]
    assert extra_mb <= models_mb * (1 + MARGIN), (
        f"loading {dtype}: {extra_mb:.0f} MB over the baseline ({run['baseline_mb']:.0f} MB) for "
        f"{models_mb:.0f} MB of models")


def test_merging_a_full_lora_peaks_at_the_models_plus_one_delta(medium):
    network = medium["network"]
    models_mb = medium["params"] * 4 / MB
    largest_delta_mb = max(int(np.prod(m.org_module.weight.shape)) for m in network.loras) * 4 / MB
    # a UNet Dense, a UNet 3x3 conv, a Dense of each text encoder
    by_kind = {}
    for module in network.loras:
        kind = "conv3x3" if module.lora_down.weight.ndim == 4 and module.lora_down.weight.shape[2] == 3 else "dense"
        by_kind.setdefault((module.lora_name.split("_")[1], kind), module)
    checked = [by_kind[key] for key in (("unet", "dense"), ("unet", "conv3x3"), ("te1", "dense"), ("te2", "dense"))]
    out = str(medium["root"] / "merged.npz")
    run = run_child(task="merge", ckpt=medium["ckpts"]["float32"], dtype="float32", lora_file=medium["lora_file"],
                    multiplier=MULTIPLIER, names=[m.lora_name for m in checked], out=out)

    extra_mb = run["peak_mb"] - run["baseline_mb"]
    assert extra_mb <= models_mb * (1 + MARGIN) + largest_delta_mb, (
        f"merging: {extra_mb:.0f} MB over the baseline ({run['baseline_mb']:.0f} MB) for {models_mb:.0f} MB of "
        f"models and a {largest_delta_mb:.0f} MB delta")
    merged = np.load(out)
    for module in checked:
        base = module.org_module.weight.asnumpy()
        down, up = module.lora_down.weight.asnumpy(), module.lora_up.weight.asnumpy()
        # a conv LoRA's up is 1x1: the delta is up @ down over down's flattened input taps
        delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(base.shape)
        expected = base + MULTIPLIER * NETWORK_ALPHA / NETWORK_DIM * delta
        assert np.abs(expected - base).max() > 1e-3, module.lora_name
        np.testing.assert_allclose(merged[module.lora_name], expected, atol=1e-5, rtol=0, err_msg=module.lora_name)


def test_a_misfitting_module_is_found_before_any_weight_changes(medium):
    """Merging module by module must not leave a half-merged model: shapes are all checked first."""
    te1, te2, vae, unet = medium["models"]
    merger, weights_sd = lora.create_network_from_weights(1.0, None, vae, [te1, te2], unet,
                                                          weights_sd=medium["network"].lora_state_dict(),
                                                          for_inference=True)
    first, last = list(merger.targets)[0], list(merger.targets)[-1]
    up_key = f"{last}.lora_up.weight"
    weights_sd[up_key] = np.zeros((weights_sd[up_key].shape[0] + 1,) + weights_sd[up_key].shape[1:], np.float32)
    before = merger.targets[first].weight.asnumpy().copy()
    with pytest.raises(ValueError, match=f"{last}: the LoRA's update has shape"):
        merger.merge_to(weights_sd)
    np.testing.assert_array_equal(merger.targets[first].weight.asnumpy(), before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident size from /proc/self/statm")
def test_dropped_models_give_their_memory_back_to_the_system(medium):
    """What sdxl_minimal_inference and the trainer do with models they are done with. With gc alone, glibc kept
    about 75% of the freed models resident (568 of 761 MB on this config)."""
    models_mb = medium["params"] * 4 / MB
    run = run_child(task="free", ckpt=medium["ckpts"]["float16"], dtype="float32")
    assert run["loaded_rss_mb"] - run["baseline_rss_mb"] >= 0.9 * models_mb  # the models were resident
    assert run["freed_rss_mb"] - run["baseline_rss_mb"] <= 0.1 * models_mb, run
