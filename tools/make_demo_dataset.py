"""Write the demo's tiny data set: a few small pictures of coloured shapes, each with a caption file.

    python tools/make_demo_dataset.py --output_dir demo_out/dataset/images

The pictures are drawn deterministically (no downloads), in two sizes so that bucketing has work to do.
"""

import argparse
import os

from PIL import Image, ImageDraw

SHAPES = [
    # (file stem, size (w, h), background, shape, colour, caption)
    ("red_circle", (64, 64), (240, 240, 230), "circle", (200, 30, 30), "sks shape, a red circle on a white background"),
    ("blue_square", (64, 64), (240, 240, 230), "square", (30, 60, 200), "sks shape, a blue square on a white background"),
    ("green_circle", (96, 64), (30, 30, 40), "circle", (40, 180, 60), "sks shape, a green circle on a dark background"),
    ("yellow_square", (96, 64), (30, 30, 40), "square", (230, 200, 40), "sks shape, a yellow square on a dark background"),
    ("purple_circle", (64, 96), (220, 230, 240), "circle", (130, 40, 160), "sks shape, a purple circle, tall picture"),
    ("orange_square", (64, 96), (220, 230, 240), "square", (240, 130, 20), "sks shape, an orange square, tall picture"),
]


def draw(size, background, shape, colour):
    image = Image.new("RGB", size, background)
    w, h = size
    r = min(w, h) // 3
    box = (w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    else:
        pen.rectangle(box, fill=colour)
    return image


def make_demo_dataset(output_dir: str):
    os.makedirs(output_dir, exist_ok=True)
    for stem, size, background, shape, colour, caption in SHAPES:
        draw(size, background, shape, colour).save(os.path.join(output_dir, stem + ".png"))
        with open(os.path.join(output_dir, stem + ".txt"), "w", encoding="utf-8") as f:
            f.write(caption + "\n")
    return len(SHAPES)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    count = make_demo_dataset(args.output_dir)
    print(f"wrote {count} images with captions to {args.output_dir}")


if __name__ == "__main__":
    main()
