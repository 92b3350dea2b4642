"""One compiled training step for every bucket, graph reuse of repeated blocks, a compile cache that keeps results
bit-identical, and runs that stop on non-finite values instead of saving them."""

import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import sdxl_train_network
from library import graph_reuse
from library.graph_compile import dynamic_input_specs
from library.sdxl_original_unet import BasicTransformerBlock
from networks import lora, lora_io
from tools.make_tiny_checkpoint import make_tiny_checkpoint
from train_helpers import tensorboard_events

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----- fast: specs and keys ------------------------------------------------------------------------------------


def test_dynamic_specs_free_the_batch_and_spatial_axes_only():
    inputs = [ms.Tensor(np.zeros((2, 4, 8, 12), np.float32)), ms.Tensor(np.zeros((2, 77, 32), np.float32)),
              ms.Tensor(np.zeros((1,), np.float32)), ms.Tensor(np.zeros((2, 4, 1, 1), np.float32))]
    specs = dynamic_input_specs(inputs, per_sample=(True, True, False, True))
    assert [tuple(s.shape) for s in specs] == [(-1, 4, -1, -1), (-1, 77, 32), (1,), (-1, 4, -1, -1)]
    assert [s.dtype for s in specs] == [ms.float32] * 4


def twin_blocks():
    return [BasicTransformerBlock(32, 2, 16, 24) for _ in range(2)]


def test_structure_key_follows_the_structure_not_the_instance():
    graph_reuse.new_graph_generation()  # as a compile starts: sharing on
    a, b = twin_blocks()
    assert a.cell_init_args == b.cell_init_args  # one graph for both
    for block, name in ((a, "lora_unet_a"), (b, "lora_unet_b")):
        block.attn1.to_q = lora.LoRAModule(name, block.attn1.to_q, lora_dim=4, alpha=1)
    assert a.cell_init_args == b.cell_init_args  # LoRA names differ, the computation does not
    c, _ = twin_blocks()
    assert c.cell_init_args != a.cell_init_args  # a LoRA deep inside changes the graph
    d, e = twin_blocks()
    d.attn1.to_q = lora.LoRAModule("x", d.attn1.to_q, lora_dim=4, alpha=1)
    e.attn1.to_q = lora.LoRAModule("x", e.attn1.to_q, lora_dim=8, alpha=1)
    assert d.cell_init_args != e.cell_init_args  # another rank
    f, _ = twin_blocks()
    f.attn1.to_q = lora.LoRAModule("x", f.attn1.to_q, lora_dim=4, alpha=1, dropout=0.1)
    assert f.cell_init_args != d.cell_init_args  # a constant of the traced code
    with pytest.raises(AttributeError, match="derived from its structure"):
        f.cell_init_args = "anything"


class TwinBlocks(ms.nn.Cell):
    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def construct(self, x, context):
        return self.second(self.first(x, context), context)


def test_reused_graph_of_twin_blocks_with_different_structure_equals_pynative():
    """The second block has a LoRA the first lacks: a graph keyed by __init__ arguments alone (lazy_inline's key)
    would run the first block's graph twice."""
    ms.set_seed(3)
    first, second = twin_blocks()
    second.attn1.to_q = lora.LoRAModule("lora_unet_q", second.attn1.to_q, lora_dim=4, alpha=4)
    rng = np.random.default_rng(0)
    second.attn1.to_q.lora_up.weight.set_data(ms.Tensor(rng.standard_normal((32, 4)).astype(np.float32)))
    net = TwinBlocks(first, second)
    graph_reuse.new_graph_generation()  # TwinBlocks is no GraphEntry: start a generation with sharing on
    x = ms.Tensor(rng.standard_normal((2, 6, 32)).astype(np.float32))
    context = ms.Tensor(rng.standard_normal((2, 5, 24)).astype(np.float32))
    mode = ms.get_context("mode")
    try:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        second.attn1.to_q.multiplier.set_data(ms.Tensor(0.0, ms.float32))
        without_lora = net(x, context).asnumpy()  # what running the first block's graph twice would give
        second.attn1.to_q.multiplier.set_data(ms.Tensor(1.0, ms.float32))
        eager = net(x, context).asnumpy()
        ms.set_context(mode=ms.GRAPH_MODE)
        graph = net(x, context).asnumpy()
    finally:
        ms.set_context(mode=mode)
    assert np.abs(eager - without_lora).max() > 1e-2  # the LoRA matters, so a wrong reuse would show
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-5)


# ----- fast: non-finite LoRA files ---------------------------------------------------------------------------


def nan_lora():
    down = np.full((4, 32), 0.1, np.float32)
    up = np.zeros((32, 4), np.float32)
    up[3, 1] = np.nan
    return {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": down,
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": up,
            "lora_unet_input_blocks_4_1_proj_in.alpha": np.array(4.0, np.float32)}


def test_a_non_finite_lora_is_never_written(tmp_path):
    path = tmp_path / "nan.safetensors"
    with pytest.raises(ValueError, match=r"nan\.safetensors: not written: lora_unet_input_blocks_4_1_proj_in\."
                                         r"lora_up\.weight has non-finite values"):
        lora_io.write_lora_file(str(path), nan_lora(), {})
    assert not path.exists() and not list(tmp_path.iterdir())


def test_inference_refuses_a_non_finite_lora_naming_file_and_module(tmp_path):
    import safetensors.numpy

    path = tmp_path / "diverged.safetensors"
    safetensors.numpy.save_file(nan_lora(), str(path))  # as a foreign tool might have written it
    with pytest.raises(ValueError, match=r"diverged\.safetensors: module lora_unet_input_blocks_4_1_proj_in: .*"
                                         r"non-finite values \(NaN or inf\)"):
        lora_io.check_sdxl_lora_file(str(path))


# ----- slow: training runs on three buckets -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket_workspace(tmp_path_factory):
    """A tiny checkpoint and six images in three aspect ratios (three buckets at 64 px)."""
    root = tmp_path_factory.mktemp("buckets")
    make_tiny_checkpoint(str(root / "tiny.safetensors"), seed=7)
    images = root / "data" / "1_sks"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 64), (96, 32), (32, 96)] * 2):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"sks picture {i}")
    return root


def bucket_flags(root, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(root / "tiny.safetensors"), "--train_data_dir", str(root / "data"),
        "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
        "--bucket_reso_steps", "32", "--caption_extension", ".txt", "--network_module", "networks.lora",
        "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3", "--max_train_steps", "6",
        "--cache_latents", "--network_train_unet_only", "--cache_text_encoder_outputs", "--seed", "11",
        "--output_dir", str(output_dir), "--output_name", "lora", "--logging_dir", str(output_dir / "logs"),
        *extra,
    ]


def run_trainer_process(flags):
    return subprocess.run([sys.executable, os.path.join(REPO, "sdxl_train_network.py"), *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def logged_losses(output_dir):
    """`loss/current` per step from the run's TensorBoard event file."""
    losses = {}
    for event in tensorboard_events(output_dir):
        losses.update({event.step: v.simple_value for v in event.summary.value if v.tag == "loss/current"})
    return [losses[step] for step in sorted(losses)]


def lora_tensors(path):
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
def test_three_buckets_one_compile_and_a_cache_that_changes_nothing(bucket_workspace, tmp_path):
    root = bucket_workspace
    plain = tmp_path / "plain"
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    trainer.train(sdxl_train_network.setup_parser().parse_args(bucket_flags(root, plain)))
    shapes = {shape[0][2:] for shape in trainer.compiled_step.seen_shapes}
    assert len(shapes) == 3  # three buckets went through the step...
    assert trainer.compiled_step.num_compiles == 1  # ...and MindSpore compiled it once

    cache = tmp_path / "cache"
    cold = run_trainer_process(bucket_flags(root, tmp_path / "cold", "--compile_cache_dir", str(cache)))
    warm = run_trainer_process(bucket_flags(root, tmp_path / "warm", "--compile_cache_dir", str(cache)))
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert cold.stderr.count("compiled the training step in") == 1
    assert warm.stderr.count("loading the training step from the compile cache") == 1
    assert "compiled the training step" not in warm.stderr

    expected_losses = logged_losses(plain)
    assert len(expected_losses) == 6 and all(np.isfinite(expected_losses))
    expected = lora_tensors(plain / "lora.safetensors")
    # the cold run is the uncached run bit for bit; the graph loaded from the cache is within an ulp of it
    # (measured: up to 1e-7 relative on a loss, not on every run: MindSpore's loaded graph, not ours)
    assert logged_losses(tmp_path / "cold") == expected_losses
    cold = lora_tensors(tmp_path / "cold" / "lora.safetensors")
    assert cold.keys() == expected.keys() and all(np.array_equal(cold[k], expected[k]) for k in expected)
    np.testing.assert_allclose(logged_losses(tmp_path / "warm"), expected_losses, rtol=1e-6, atol=0)
    warm = lora_tensors(tmp_path / "warm" / "lora.safetensors")
    assert warm.keys() == expected.keys()
    # AdamW divides by sqrt(v): where a gradient is near zero an ulp of it moves a weight by up to a fraction of
    # the learning rate (measured: 1.1e-5 once in CI). A wrong or NaN graph is off by whole steps (1e-3 each).
    for key in expected:
        np.testing.assert_allclose(warm[key], expected[key], rtol=0, atol=1e-4, err_msg=key)

    # the same flags but a learning rate that diverges: the warm cache serves it (the rate is a parameter)
    diverged = run_trainer_process(bucket_flags(
        root, tmp_path / "diverged", "--compile_cache_dir", str(cache), "--learning_rate", "1e30",
        "--max_grad_norm", "0", "--save_every_n_steps", "1"))
    assert diverged.returncode != 0
    last_line = diverged.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: step ") and "training stopped" in last_line
    assert "(batch: " in last_line and "img" in last_line
    stopped_at = int(last_line.split()[2])
    saved = sorted(os.listdir(tmp_path / "diverged"))
    assert "lora.safetensors" not in saved
    assert [f for f in saved if f.endswith(".safetensors")] == [
        f"lora-step{step:08d}.safetensors" for step in range(1, stopped_at)]
    for name in saved:
        if name.endswith(".safetensors"):
            assert all(np.isfinite(v).all() for v in lora_tensors(tmp_path / "diverged" / name).values())
