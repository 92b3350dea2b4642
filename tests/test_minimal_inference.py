"""sdxl_minimal_inference: determinism, LoRA merging, the Euler update, prompt routing, the CLI and its errors.
(The other samplers of --sampler: tests/test_samplers.py.)

Everything runs on the tiny random checkpoint at 64x64 (8x8 latents) with 2-3 steps, eagerly, except the CLI
end-to-end run, which takes the default graph path and is compared with the eager image.
"""

import inspect
import logging
import os
import re
import weakref

import mindspore as ms
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import sdxl_minimal_inference as smi
from library import autoencoder_kl, layers, samplers
from library.sdxl_model_util import state_dict_of
from library.sdxl_text_encoding import encode_tokens_sdxl
from tools.make_tiny_checkpoint import make_tiny_checkpoint

SIZE = (64, 64)
STEPS = 2

# Kohya LoRA module names of the tiny model -> (pipeline attribute of the model, the parameter it updates)
LORA_TARGETS = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        ("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k":
        ("unet", "middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
    "lora_unet_output_blocks_3_1_proj_in": ("unet", "output_blocks.3.1.proj_in.weight"),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
        ("text_encoder1", "text_model.encoder.layers.0.self_attn.q_proj.weight"),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": ("text_encoder2", "text_model.encoder.layers.1.mlp.fc1.weight"),
}
LORA_DIM, LORA_ALPHA = 4, 2.0


@pytest.fixture(scope="module", autouse=True)
def eager_context():
    previous = ms.get_context("mode"), ms.get_context("pynative_synchronize")
    smi.use_synchronous_pynative()
    yield
    ms.set_context(mode=previous[0], pynative_synchronize=previous[1])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    make_tiny_checkpoint(str(path), seed=0)
    return str(path)


@pytest.fixture(scope="module")
def pipeline(ckpt):
    return smi.SdxlPipeline(ckpt, graph_mode=False)


@pytest.fixture(scope="module")
def base_image(pipeline):
    return generate(pipeline, seed=1)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, pipeline):
    """A LoRA with Kohya's keys for a few UNet, TE1 and TE2 modules, with non-zero up weights."""
    rng = np.random.default_rng(7)
    tensors = {}
    for name, (model, param) in LORA_TARGETS.items():
        out_features, in_features = state_dict_of(getattr(pipeline, model))[param].shape
        tensors[f"{name}.lora_down.weight"] = rng.normal(0, 0.5, (LORA_DIM, in_features)).astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = rng.normal(0, 0.5, (out_features, LORA_DIM)).astype(np.float32)
        tensors[f"{name}.alpha"] = np.array(LORA_ALPHA, dtype=np.float32)
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return str(path), tensors


def generate(pipeline, **kwargs):
    settings = dict(prompt="a red cube", target_size=SIZE, steps=STEPS, seed=0, progress=False)
    return pipeline.generate(**{**settings, **kwargs})


# ------------------------------------------------------------------------------------------------ determinism

def test_same_seed_same_image_other_seed_other_image(pipeline, base_image):
    assert base_image.shape == (*SIZE, 3) and base_image.dtype == np.uint8
    np.testing.assert_array_equal(generate(pipeline, seed=1), base_image)
    assert np.abs(generate(pipeline, seed=2).astype(int) - base_image).mean() > 1.0


# ------------------------------------------------------------------------------------------------ LoRA

def test_lora_with_multiplier_zero_gives_the_image_without_it(ckpt, lora_file, base_image):
    pipeline = smi.SdxlPipeline(ckpt, [smi.LoraWeight(lora_file[0], 0.0)], graph_mode=False)
    np.testing.assert_array_equal(generate(pipeline, seed=1), base_image)


def test_lora_merges_into_unet_and_both_text_encoders_and_changes_the_image(ckpt, pipeline, lora_file, base_image):
    path, tensors = lora_file
    multiplier = 0.7
    merged = smi.SdxlPipeline(ckpt, [smi.LoraWeight(path, multiplier)], graph_mode=False)
    for name, (model, param) in LORA_TARGETS.items():
        base, after = state_dict_of(getattr(pipeline, model)), state_dict_of(getattr(merged, model))
        delta = tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"] * (LORA_ALPHA / LORA_DIM)
        np.testing.assert_allclose(after[param], base[param] + multiplier * delta, rtol=1e-5, atol=1e-5)
    assert np.abs(generate(merged, seed=1).astype(int) - base_image).mean() > 1.0


def test_two_loras_merge_one_after_the_other(ckpt, pipeline, lora_file):
    path, tensors = lora_file
    merged = smi.SdxlPipeline(ckpt, [smi.LoraWeight(path, 0.5), smi.LoraWeight(path, -0.25)], graph_mode=False)
    name, (_, param) = next(iter(LORA_TARGETS.items()))
    delta = tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"] * (LORA_ALPHA / LORA_DIM)
    np.testing.assert_allclose(state_dict_of(merged.unet)[param], state_dict_of(pipeline.unet)[param] + 0.25 * delta,
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ Euler update

def numpy_euler_schedule(steps):
    """Timesteps and sigmas of an Euler sampler over SD's 1000-step scaled-linear schedule, spaced evenly in t."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    train_sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)  # x_t = x_0 + sigma * eps, scaled by sqrt(abar)
    timesteps = np.linspace(0, 999, steps)[::-1]
    sigmas = np.interp(timesteps, np.arange(1000), train_sigmas)
    return timesteps, np.append(sigmas, 0.0)


def test_first_euler_step_matches_numpy(pipeline, monkeypatch):
    calls = []
    guided_unet = pipeline.guided_unet

    def recording_guided_unet(x, t, *conditioning):
        noise_pred = guided_unet(x, t, *conditioning)
        calls.append((x.asnumpy(), float(t.asnumpy()), noise_pred.asnumpy()))
        return noise_pred

    monkeypatch.setattr(pipeline, "guided_unet", recording_guided_unet)
    steps, seed = 3, 5
    generate(pipeline, steps=steps, seed=seed)

    timesteps, sigmas = numpy_euler_schedule(steps)
    noise = np.random.default_rng(seed).standard_normal((1, 4, SIZE[0] // 8, SIZE[1] // 8), dtype=np.float32)
    x0 = noise * sigmas[0]
    (input0, t0, eps0), (input1, t1, _) = calls[:2]
    assert len(calls) == steps
    assert (t0, t1) == pytest.approx((999.0, timesteps[1]))
    # the eps-model sees x / sqrt(sigma^2 + 1), the variance-preserving scaling it was trained on
    np.testing.assert_allclose(input0, x0 / np.sqrt(sigmas[0] ** 2 + 1), rtol=1e-5, atol=1e-6)
    # Euler on dx/dsigma = (x - denoised) / sigma = eps, from sigma_0 to sigma_1, with the model's own output
    x1 = x0 + (sigmas[1] - sigmas[0]) * eps0
    np.testing.assert_allclose(input1, x1 / np.sqrt(sigmas[1] ** 2 + 1), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ conditioning

class FirstConditioningValue(ms.nn.Cell):
    """A stand-in UNet whose noise prediction is y[:, 0] everywhere, so each CFG batch half is recognisable."""

    def construct(self, x, timestep, context, y):
        return ms.ops.ones_like(x) * y[:, :1].reshape(-1, 1, 1, 1)


def test_guidance_extrapolates_from_the_negative_half_towards_the_positive_half():
    x = ms.Tensor(np.zeros((1, 4, 2, 2), np.float32))
    context = ms.Tensor(np.zeros((2, 77, 8), np.float32))
    y = ms.Tensor(np.array([[1.0, 0.0], [3.0, 0.0]], np.float32))  # [negative, positive]
    guided = smi.GuidedUNet(FirstConditioningValue())(x, ms.Tensor(999.0), context, y, ms.Tensor(7.0))
    np.testing.assert_allclose(guided.asnumpy(), np.full((1, 4, 2, 2), 1.0 + 7.0 * (3.0 - 1.0)))


def numpy_size_embedding(values, dim=256):
    """SGM's sinusoidal embedding of each value, [cos | sin], frequencies 10000^(-k / (dim / 2)), concatenated."""
    freqs = np.exp(-np.log(10000.0) * np.arange(dim // 2) / (dim // 2))
    return np.concatenate([np.concatenate([np.cos(v * freqs), np.sin(v * freqs)]) for v in values])


def test_size_conditioning_embeds_original_crop_and_target_for_both_halves(pipeline):
    context, y = pipeline.conditioning("a red cube", "a red cube", "", original_size=(1024, 768),
                                       crop_top_left=(16, 32), target_size=(64, 96))
    _, pool2 = pipeline.encode_prompt("a red cube", "a red cube")
    _, uncond_pool2 = pipeline.encode_prompt("", "")
    expected = numpy_size_embedding([1024, 768, 16, 32, 64, 96])
    pool_dim = pool2.shape[1]
    y = y.asnumpy()
    assert context.shape[0] == 2 and y.shape == (2, pool_dim + 1536)
    # atol: MindSpore computes the angles (up to 1024 rad) in fp32
    np.testing.assert_allclose(y[:, pool_dim:], np.stack([expected, expected]), atol=1e-4)
    np.testing.assert_allclose(y[0, :pool_dim], uncond_pool2.asnumpy()[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y[1, :pool_dim], pool2.asnumpy()[0], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ prompts

def test_prompt2_reaches_text_encoder_2_with_its_own_tokens(pipeline):
    context, pool2 = pipeline.encode_prompt("a red cube", "a blue sphere")
    ids1, _ = pipeline.tokenizer.tokenize("a red cube")
    _, ids2 = pipeline.tokenizer.tokenize("a blue sphere")
    assert ids2[0, -1] == 0 and ids1[0, -1] == 49407  # TE2's tokenizer pads with 0, TE1's with the end token
    hidden1, hidden2, expected_pool2 = encode_tokens_sdxl(
        pipeline.text_encoder1, pipeline.text_encoder2, ms.Tensor(ids1[None]), ms.Tensor(ids2[None]))
    expected_context = np.concatenate([hidden1.asnumpy(), hidden2.asnumpy()], axis=2)
    np.testing.assert_allclose(context.asnumpy(), expected_context, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pool2.asnumpy(), expected_pool2.asnumpy(), rtol=1e-6, atol=1e-6)


def test_prompt2_changes_the_image_and_defaults_to_prompt(pipeline, base_image):
    np.testing.assert_array_equal(generate(pipeline, seed=1, prompt2="a red cube"), base_image)
    assert np.abs(generate(pipeline, seed=1, prompt2="a blue sphere").astype(int) - base_image).mean() > 0.5


# ------------------------------------------------------------------------------------------------ command line

def test_cli_writes_one_png_of_the_requested_size_in_graph_mode(ckpt, pipeline, tmp_path):
    out = tmp_path / "out"
    smi.main(["--ckpt_path", ckpt, "--prompt", "a red cube", "--target_height", "64", "--target_width", "96",
              "--steps", "2", "--seed", "3", "--output_dir", str(out)])
    files = os.listdir(out)
    assert len(files) == 1 and files[0].startswith("image_") and files[0].endswith("_000.png")
    image = np.asarray(Image.open(out / files[0]))
    assert image.shape == (64, 96, 3)
    # the compiled UNet gives the eager image, up to rounding
    eager = generate(pipeline, target_size=(64, 96), seed=3)
    assert np.abs(image.astype(int) - eager).max() <= 2


# ------------------------------------------------------------------------------------------------ memory

def test_attention_in_chunks_equals_numpy_attention(monkeypatch):
    rng = np.random.default_rng(3)
    b, lq, lk, heads, d = 2, 37, 11, 3, 4
    q, k, v = (rng.standard_normal((b, n, heads * d)).astype(np.float32) for n in (lq, lk, lk))

    def split_heads(t):
        return t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3)

    scores = split_heads(q) @ split_heads(k).transpose(0, 1, 3, 2) / np.sqrt(d)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = (probs @ split_heads(v)).transpose(0, 2, 1, 3).reshape(b, lq, heads * d)

    chunk_lengths = []
    attention = layers.attention
    monkeypatch.setattr(layers, "attention", lambda q, *args: chunk_lengths.append(q.shape[1]) or attention(q, *args))
    out = layers.attention_in_chunks(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v), heads, max_scores=b * heads * lk * 5)
    assert chunk_lengths == [5] * 7 + [2]
    np.testing.assert_allclose(out.asnumpy(), expected, rtol=1e-5, atol=1e-6)


def test_eager_attention_in_chunks_gives_the_same_image(pipeline, base_image, monkeypatch):
    chunked_calls = {"unet": 0, "vae": 0}

    def counting(model, module):
        function = module.attention_in_chunks

        def attention_in_chunks(*args):
            chunked_calls[model] += 1
            return function(*args)
        monkeypatch.setattr(module, "attention_in_chunks", attention_in_chunks)

    counting("unet", layers)  # the UNet's CrossAttention calls layers.attention_in_chunks
    counting("vae", autoencoder_kl)
    try:
        for model in (pipeline.unet, pipeline.vae):
            layers.limit_eager_attention_scores(model, 300)  # a few queries per chunk on the tiny model
        image = generate(pipeline, seed=1)
    finally:
        for model in (pipeline.unet, pipeline.vae):
            layers.limit_eager_attention_scores(model)
    unet_attentions = sum(hasattr(cell, "max_attention_scores") for _, cell in pipeline.unet.cells_and_names())
    # two UNet calls (steps) of every attention cell, one VAE decode
    assert chunked_calls == {"unet": STEPS * unet_attentions, "vae": 1}
    assert np.abs(image.astype(int) - base_image).max() <= 1  # the same up to rounding


def test_release_models_frees_the_text_encoders_before_sampling_and_the_unet_before_decoding(ckpt, base_image,
                                                                                            monkeypatch):
    pipeline = smi.SdxlPipeline(ckpt, graph_mode=False)
    refs = {name: weakref.ref(getattr(pipeline, name)) for name in ("text_encoder1", "text_encoder2", "unet")}
    alive = {}
    sample_latents = samplers.sample_latents

    def sample_and_record(*args, **kwargs):
        alive["sampling"] = sorted(name for name, ref in refs.items() if ref() is not None)
        return sample_latents(*args, **kwargs)

    decode = pipeline.vae.decode

    def decode_and_record(latents):
        alive["decoding"] = sorted(name for name, ref in refs.items() if ref() is not None)
        return decode(latents)

    monkeypatch.setattr(samplers, "sample_latents", sample_and_record)
    monkeypatch.setattr(pipeline.vae, "decode", decode_and_record)
    image = generate(pipeline, seed=1, release_models=True)
    assert alive == {"sampling": ["unet"], "decoding": []}
    np.testing.assert_array_equal(image, base_image)
    with pytest.raises(RuntimeError, match="released its models"):
        generate(pipeline, seed=1)


def test_default_mode_compiles_except_sdxl_size_unets_on_cpu(pipeline, monkeypatch):
    assert ms.get_context("device_target") == "CPU"
    assert smi.default_graph_mode(pipeline.unet)
    unet_params = sum(param.size for param in pipeline.unet.get_parameters())
    monkeypatch.setattr(smi, "LARGEST_COMPILED_UNET_ON_CPU", unet_params - 1)
    assert not smi.default_graph_mode(pipeline.unet)
    assert smi.SdxlPipeline.from_models(*pipeline.models, pipeline.tokenizer, graph_mode=None).graph_mode is False


def test_save_image_never_overwrites(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    paths = {smi.save_image(image, str(tmp_path)) for _ in range(3)}
    assert len(paths) == 3 and sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)


@pytest.fixture(scope="module")
def foreign_lora(tmp_path_factory):
    """An SD 1.x LoRA: one text encoder (`lora_te_`) and diffusers-named UNet blocks that SDXL's tiny UNet lacks."""
    tensors = {}
    for name, shape in (("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (768, 768)),
                        ("lora_unet_down_blocks_0_attentions_0_proj_in", (320, 320))):
        tensors[f"{name}.lora_down.weight"] = np.ones((4, shape[1]), np.float32)
        tensors[f"{name}.lora_up.weight"] = np.ones((shape[0], 4), np.float32)
    path = tmp_path_factory.mktemp("foreign") / "sd15_lora.safetensors"
    save_file(tensors, str(path))
    return str(path)


@pytest.mark.parametrize("case, extra_args, message", [
    ("missing checkpoint", ["--ckpt_path", "nowhere.safetensors"], "checkpoint not found: nowhere.safetensors"),
    ("missing LoRA", ["--lora_weights", "nowhere.safetensors;0.5"], "LoRA file not found: nowhere.safetensors"),
    ("malformed LoRA spec", ["--lora_weights", "{lora};strong"], "expected 'path' or 'path;multiplier'"),
    ("LoRA for another model", ["--lora_weights", "{foreign}"], "it looks like an SD 1.x/2.x LoRA"),
    ("size not a multiple of 8", ["--target_height", "60"], "positive multiples of 8"),
    ("size the UNet cannot halve twice", ["--target_width", "72"], "positive multiples of 32"),
    ("too few steps for the sampler", ["--sampler", "pndm"], "--sampler pndm needs at least 4 steps, got 2"),
])
def test_cli_bad_input_fails_before_sampling_and_writes_nothing(ckpt, lora_file, foreign_lora, tmp_path, capsys,
                                                               case, extra_args, message):
    out = tmp_path / "out"
    args = ["--ckpt_path", ckpt, "--target_height", "64", "--target_width", "64", "--steps", "2", "--seed", "0",
            "--output_dir", str(out)]
    args += [a.format(lora=lora_file[0], foreign=foreign_lora) for a in extra_args]
    with pytest.raises(SystemExit) as exit_info:
        smi.main(args)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_sampler_flag_takes_the_trainers_sampler_names_and_defaults_to_euler(capsys):
    parser = smi.setup_parser()
    assert parser.parse_args(["--ckpt_path", "x"]).sampler == "euler"
    for name in samplers.SAMPLER_NAMES:
        assert parser.parse_args(["--ckpt_path", "x", "--sampler", name]).sampler == name
    with pytest.raises(SystemExit):
        parser.parse_args(["--ckpt_path", "x", "--sampler", "plms"])
    assert "invalid choice: 'plms'" in capsys.readouterr().err
    assert inspect.signature(smi.SdxlPipeline.generate).parameters["sampler"].default == "euler"


def write_lora(path, shapes):
    save_file({key: np.zeros(shape, np.float32) for key, shape in shapes.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("shapes, message", [
    ({"lora_unet_output_blocks_3_1_proj_in.lora_down.weight": (4, 64),
      "lora_unet_output_blocks_3_1_proj_in.lora_up.weight": (64, 8)},
     r"module lora_unet_output_blocks_3_1_proj_in: lora_down.weight \(4, 64\) has rank 4, so lora_up.weight should "
     r"have shape \(64, 4\); found \(64, 8\)$"),
    ({"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": (4, 32, 3, 3),
      "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": (32, 2, 1, 1)},
     r"lora_down.weight \(4, 32, 3, 3\) has rank 4, so lora_up.weight should have shape \(32, 4, 1, 1\); "
     r"found \(32, 2, 1, 1\)$"),
    ({"lora_unet_output_blocks_3_1_proj_in.lora_down.weight": (4, 64)}, "has lora_down.weight but no lora_up.weight"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4)},
     "it looks like an SD 1.x/2.x LoRA .UNet blocks SDXL does not have"),
    ({"lora_unet_middle_block_1_proj_in.hada_w1_a": (64, 4), "lora_unet_middle_block_1_proj_in.hada_w1_b": (4, 64)},
     "it looks like a LyCORIS LoHa file"),
    ({"lora_unet_middle_block_1_proj_in.lokr_w1": (8, 8), "lora_unet_middle_block_1_proj_in.lokr_w2": (8, 8)},
     "it looks like a LyCORIS LoKr file"),
])
def test_lora_file_checks_name_the_file_and_the_problem(ckpt, tmp_path, shapes, message):
    path = write_lora(tmp_path / "bad.safetensors", shapes)
    with pytest.raises(ValueError, match=f"^{re.escape(path)}: .*{message}") as error:
        smi.SdxlPipeline(ckpt, [smi.LoraWeight(path, 1.0)])
    assert "\n" not in str(error.value)


def test_rank_mismatch_fails_before_the_checkpoint_loads(ckpt, tmp_path, capsys):
    path = write_lora(tmp_path / "bad_rank.safetensors", {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (8, 32),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (37, 4)})
    with pytest.raises(SystemExit):
        smi.main(["--ckpt_path", ckpt, "--lora_weights", path, "--target_height", "64", "--target_width", "64",
                  "--steps", "1", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"{path}: module lora_te1_text_model_encoder_layers_0_mlp_fc1: lora_down.weight (8, 32) has rank 8" in err
    assert not (tmp_path / "out").exists()


def test_bf16_on_cpu_runs_in_fp32_with_a_warning(caplog):
    if ms.get_context("device_target") != "CPU":
        pytest.skip("bf16 runs on GPU/Ascend")
    with caplog.at_level(logging.WARNING):
        assert smi.runnable_dtype("bf16") == "fp32"
    assert [r.getMessage() for r in caplog.records] == [
        "--dtype bf16: MindSpore has no bf16 matmul kernel on CPU; computing in fp32 instead"]
    assert smi.runnable_dtype("fp32") == "fp32"
