"""TrainStepForSDXLLoRA: gradient accumulation and clipping, on the tiny model with cached inputs."""

import mindspore as ms
import numpy as np
import pytest

import sdxl_train_network
from library import optimizers, sdxl_model_util
from networks import lora
from tools.make_tiny_checkpoint import make_tiny_checkpoint

BATCH = 2


class PlainBatches(list):
    """What the step reads of a data set: its length, and that batches carry no caption weights or loss masks."""

    weighted_captions = False
    with_masks = False

    def __init__(self):
        super().__init__([None] * BATCH)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("step") / "tiny.safetensors"
    make_tiny_checkpoint(str(path), seed=2)
    return str(path)


def make_args(*extra):
    return sdxl_train_network.setup_parser().parse_args([
        "--network_module", "networks.lora", "--optimizer_type", "SGDNesterov", "--learning_rate", "0.05",
        "--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only", *extra,
    ])


def build_step(ckpt, args):
    """Fresh models from the checkpoint, a UNet LoRA with fixed non-zero weights, and the train step."""
    te1, te2, vae, unet, _, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(ckpt)
    network = lora.create_network(1.0, 4, 4, vae, [te1, te2], unet)
    network.apply_to([te1, te2], unet, False, True)
    rng = np.random.default_rng(0)
    for param in network.get_trainable_params():
        param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))
    groups, _ = network.prepare_optimizer_params(None, None, args.learning_rate)
    _, _, optimizer = optimizers.get_optimizer(args, groups)
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    step = trainer.build_train_step(args, network, optimizer, (te1, te2), vae, unet, PlainBatches(), ms.float32)
    step.set_train(True)
    return step, network


def inputs():
    rng = np.random.default_rng(1)
    f32 = np.float32
    return (
        rng.standard_normal((BATCH, 4, 8, 8)).astype(f32),  # latents
        rng.standard_normal((BATCH, 77, 32)).astype(f32),  # hidden_state1
        rng.standard_normal((BATCH, 77, 32)).astype(f32),  # hidden_state2
        rng.standard_normal((BATCH, 32)).astype(f32),  # pool2
        np.ones(BATCH, f32),  # loss_weights
        np.full((BATCH, 2), 64, np.int32), np.zeros((BATCH, 2), np.int32), np.full((BATCH, 2), 64, np.int32),
        rng.standard_normal((BATCH, 4, 8, 8)).astype(f32),  # noise
        np.array([300, 700], np.int32),  # timesteps
    )


def lora_weights(network):
    return {k: v.copy() for k, v in network.lora_state_dict().items() if not k.endswith("alpha")}


def run(step, arrays):
    return step(*(ms.Tensor(a) for a in arrays))


@pytest.mark.slow
def test_accumulating_two_batches_of_one_equals_one_batch_of_two(ckpt):
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        arrays = inputs()
        whole, whole_net = build_step(ckpt, make_args())
        before = lora_weights(whole_net)
        run(whole, arrays)
        after_whole = lora_weights(whole_net)

        accumulated, acc_net = build_step(ckpt, make_args("--gradient_accumulation_steps", "2"))
        np.testing.assert_array_equal(lora_weights(acc_net)["lora_unet_middle_block_1_proj_in.lora_up.weight"],
                                      before["lora_unet_middle_block_1_proj_in.lora_up.weight"])
        run(accumulated, [a[:1] for a in arrays])
        assert not bool(accumulated.sync_gradients.asnumpy())
        assert all(np.array_equal(v, before[k]) for k, v in lora_weights(acc_net).items())  # no step yet
        run(accumulated, [a[1:] for a in arrays])
        assert bool(accumulated.sync_gradients.asnumpy())
        after_acc = lora_weights(acc_net)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)

    # float32 sums in another order: agreement to 1e-7 (a few ulps of weights ~0.1), far below the updates
    updates = []
    for key, value in after_whole.items():
        np.testing.assert_allclose(after_acc[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
        updates.append(np.abs(value - before[key]).max())
    assert min(updates) > 1e-6


def test_max_grad_norm_zero_disables_clipping(ckpt):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    arrays = inputs()
    deltas = {}
    for norm in ("0", "1e9", "1e-3"):
        step, network = build_step(ckpt, make_args("--max_grad_norm", norm))
        before = lora_weights(network)
        run(step, arrays)
        deltas[norm] = np.concatenate([(v - before[k]).ravel() for k, v in lora_weights(network).items()])
    # deltas are differences of weights ~0.1: a few float32 ulps (1e-8) of noise
    np.testing.assert_allclose(deltas["0"], deltas["1e9"], rtol=1e-6, atol=5e-8)
    # clipping at 1e-3 scales the whole gradient down (the first SGD-Nesterov step is linear in it)
    ratio = np.linalg.norm(deltas["1e-3"]) / np.linalg.norm(deltas["0"])
    assert ratio < 0.5
    np.testing.assert_allclose(deltas["1e-3"], deltas["0"] * ratio, rtol=1e-3, atol=5e-8)
