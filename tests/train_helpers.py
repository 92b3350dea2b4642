"""A tiny training workspace shared by the trainer tests: a random tiny checkpoint and a DreamBooth folder."""

import glob
import struct

import numpy as np
from PIL import Image
from tensorboardX.proto import event_pb2

from tools.make_tiny_checkpoint import make_tiny_checkpoint


def write_training_workspace(root, num_images: int, num_repeats: int):
    """(checkpoint path, train_data_dir) under `root`: `<repeats>_sks/img<i>.png` colour gradients with captions."""
    ckpt = root / "tiny.safetensors"
    make_tiny_checkpoint(str(ckpt), seed=7)
    write_caption_images(root / "data" / f"{num_repeats}_sks", num_images)
    return str(ckpt), str(root / "data")


def write_caption_images(image_dir, count: int):
    """`img<i>.png` 64x64 colour gradients in a new folder, each with the caption `sks picture number <i>`."""
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        y, x = np.mgrid[0:64, 0:64] / 63.0
        colour = rng.uniform(0, 1, (3,))
        pixels = np.stack([x * colour[0], y * colour[1], (1 - x) * colour[2]], axis=-1)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(image_dir / f"img{i}.png")
        (image_dir / f"img{i}.txt").write_text(f"sks picture number {i}")


def tensorboard_events(output_dir):
    """The events of the run's one TensorBoard file under `<output_dir>/logs` (read with the protobuf, no
    TensorBoard)."""
    (path,) = glob.glob(str(output_dir / "logs" / "**" / "events.out.tfevents.*"), recursive=True)
    data, i = open(path, "rb").read(), 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[i + 12:i + 12 + length])
        i += 12 + length + 4
        yield event
