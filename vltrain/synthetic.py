"""A synthetic, deterministic visual question answering set: coloured shapes on a noisy background.

Each image holds one shape (circle / square / triangle) in one colour (red / green / blue / yellow)
near the centre, at a random size and offset. Each sample asks either its colour or its shape, with the (shape,
colour, question) combinations balanced, so a model that ignores the pixels scores at chance
(1/4 on colour questions, 1/3 on shape questions). Written as LLaVA JSON + PNG files so the demo
goes through the same data path as a user's dataset. The DPO pairs and the classification records
(`write_shape_classes`: the shape's name as the label) are drawn the same way.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is in the image?"}


def draw_shape(shape: str, colour: str, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(90, 160) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(size):  # light pixel noise
        x, y = rng.randrange(size), rng.randrange(size)
        draw.point((x, y), fill=tuple(rng.randint(60, 200) for _ in range(3)))
    extent = rng.randint(size * 7 // 10, size * 9 // 10)
    jitter = size // 16
    x0 = max(0, min(size - extent, (size - extent) // 2 + rng.randint(-jitter, jitter)))
    y0 = max(0, min(size - extent, (size - extent) // 2 + rng.randint(-jitter, jitter)))
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return image


def _write_split_files(out_dir: Path, params: dict, make_record, *, num_train: int, num_eval: int, image_size: int,
                       seed: int, combos: list[tuple[str, str, str]] | None = None) -> tuple[Path, Path]:
    """`train.json`, `eval.json` and `images/*.png` under `out_dir`, one image per record; `make_record(id, image
    name, shape, colour, question kind)` gives the record, sample i drawing `combos[i % len(combos)]` (default:
    every (shape, colour, question kind), shape-major). An existing set with the same `params` is reused."""
    stamp = out_dir / "params.json"
    train_path, eval_path = out_dir / "train.json", out_dir / "eval.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params and train_path.exists() and eval_path.exists():
        return train_path, eval_path
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = combos or list(itertools.product(SHAPES, COLOURS, QUESTIONS))
    for split, count, path in (("train", num_train, train_path), ("eval", num_eval, eval_path)):
        records = []
        for i in range(count):
            shape, colour, kind = combos[i % len(combos)]
            name = f"{split}_{i:05d}.png"
            draw_shape(shape, colour, image_size, rng).save(out_dir / "images" / name)
            records.append(make_record(f"{split}-{i}", name, shape, colour, kind))
        rng.shuffle(records)
        path.write_text(json.dumps(records, indent=1))
    stamp.write_text(json.dumps(params))
    return train_path, eval_path


def mislabeled(answer: str) -> str:
    """The wrong name a mislabelled record gives: the next colour (red -> green -> blue -> yellow -> red) or the
    next shape (circle -> square -> triangle -> circle)."""
    names = list(COLOURS) if answer in COLOURS else list(SHAPES)
    return names[(names.index(answer) + 1) % len(names)]


def write_shapes_dataset(out_dir: str | Path, *, num_train: int = 2400, num_eval: int = 240, image_size: int = 56,
                         seed: int = 0, mislabel: float = 0.0, kinds: tuple[str, ...] = tuple(QUESTIONS)
                         ) -> tuple[Path, Path]:
    """Write the SFT set (LLaVA records answering with the bare colour or shape) under `out_dir`; returns the
    train and eval JSON paths. Deterministic in `seed`; an existing complete set with the same parameters is reused.
    `kinds`: the questions asked ("colour", "shape"). `mislabel` > 0: that fraction of the TRAIN colour answers
    (drawn per record id) is `mislabeled(answer)`, a consistent annotation mistake; shape answers and the eval
    records stay right (the GRPO demo's SFT stage learns the mistake, GRPO unlearns it)."""
    params = {"num_train": num_train, "num_eval": num_eval, "image_size": image_size, "seed": seed, "version": 3}
    if mislabel:
        params["mislabel"] = mislabel
    if tuple(kinds) != tuple(QUESTIONS):
        params["kinds"] = list(kinds)

    def record(sample_id, image, shape, colour, kind):
        answer = colour if kind == "colour" else shape
        if (kind == "colour" and sample_id.startswith("train-")
                and random.Random(f"{seed}-{sample_id}").random() < mislabel):
            answer = mislabeled(answer)
        return {"id": sample_id, "image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTIONS[kind]}"}, {"from": "gpt", "value": answer}]}

    combos = list(itertools.product(SHAPES, COLOURS, kinds))
    return _write_split_files(Path(out_dir), params, record, num_train=num_train, num_eval=num_eval,
                              image_size=image_size, seed=seed, combos=combos)


def chosen_reply(answer: str) -> str:
    """The behaviour the DPO demo's pairs prefer: a full sentence instead of the bare word SFT taught."""
    return f"It is {answer}."


def write_shape_pairs(out_dir: str | Path, *, num_train: int = 1200, num_eval: int = 120, image_size: int = 56,
                      seed: int = 1) -> tuple[Path, Path]:
    """Write the DPO demo's pairs (the upstream DPO format) under `out_dir`: the same questions as the SFT set,
    `chosen` = `chosen_reply(answer)` ("It is red."), `rejected` = the bare answer the SFT demo taught
    ("red"). A model that answers with the chosen sentence after DPO has changed behaviour, checkably."""
    params = {"num_train": num_train, "num_eval": num_eval, "image_size": image_size, "seed": seed, "version": 1,
              "kind": "pairs"}

    def record(sample_id, image, shape, colour, kind):
        answer = colour if kind == "colour" else shape
        return {"id": sample_id, "image": image, "prompt": f"<image>\n{QUESTIONS[kind]}",
                "chosen": chosen_reply(answer), "rejected": answer}

    return _write_split_files(Path(out_dir), params, record, num_train=num_train, num_eval=num_eval,
                              image_size=image_size, seed=seed)


def write_shape_classes(out_dir: str | Path, *, num_train: int = 2400, num_eval: int = 240, image_size: int = 56,
                        seed: int = 2) -> tuple[Path, Path]:
    """Write the classification demo's records `{"id", "image", "label": shape}` (no prompt: the default prompt
    applies; classes [circle, square, triangle], vltrain.data.labels) under `out_dir`, balanced over shapes and
    colours (exactly, for counts that are multiples of 12). A model that ignores the pixels scores 1/3."""
    params = {"num_train": num_train, "num_eval": num_eval, "image_size": image_size, "seed": seed, "version": 1,
              "kind": "classes"}

    def record(sample_id, image, shape, colour, kind):
        return {"id": sample_id, "image": image, "label": shape}

    # shape fastest: any 3 consecutive samples hold each shape once, any 12 each (shape, colour) once
    combos = [(shape, colour, "shape") for colour in COLOURS for shape in SHAPES]
    return _write_split_files(Path(out_dir), params, record, num_train=num_train, num_eval=num_eval,
                              image_size=image_size, seed=seed, combos=combos)
