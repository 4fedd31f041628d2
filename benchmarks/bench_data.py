"""Data-loader throughput: samples/s and tokens/s that SFTDataset + build_loader deliver per num_workers.

    python benchmarks/bench_data.py                                   # tiny qwen2_5_vl processor, workers 0,1,2,4
    python benchmarks/bench_data.py --workers 0,2,4,8,16 --gpu_tokens_per_s 13419   # vs Qwen2.5-VL-3B full SFT, H200
    python benchmarks/bench_data.py --processor /ckpt/Qwen2.5-VL-3B-Instruct --model_type qwen2_5_vl
    python benchmarks/bench_data.py --lengths_only                    # token-budget lengths: estimate vs encode

Data written at startup under --workdir (reused when present): `--num_images` JPEGs of --image_size (default
1280x960, smooth random content plus grain, about the file size of a photo) and `--num_videos` mp4 clips
(mpeg4, --video_size, --video_seconds at --video_fps), and SFT records in the LLaVA format: mostly one image,
some two images, the clips as video samples, a question and an answer of 20-200 words each.

Each setting builds the real path (SFTDataset with MediaOptions from the data config, build_loader with
packing and, when --max_tokens_per_batch is given, the token budget) and runs --epochs passes over the data.
Reported per num_workers: seconds to the first batch (worker start-up), then the delivered samples/s and
tokens/s (tokens = the batches' input_ids) over the rest; with --gpu_tokens_per_s (what training consumes,
e.g. 13,419 tokens/s for Qwen2.5-VL-3B full SFT on an H200, benchmarks/RESULTS.md) the ratio delivered /
consumed: below 1 the GPU waits for data.

The tiny processor's image / video processors are transformers' own Qwen2-VL classes (only the tokenizer and
the patch sizes are small), so per-sample media cost is the real one; `--processor PATH` loads a checkpoint's.
Also printed (skip with --no_lengths): the up-front length pass of data.max_tokens_per_batch over the image
records, estimated from headers (vltrain.data.lengths) vs encoded (`example_lengths(..., estimate=False)`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("the a red blue small large bus cat dog road tree sky person car building window left right "
         "near far shows image picture scene two three several bright dark colour shape moving standing").split()


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (size[1], size[0], 3))
    Image.fromarray(np.clip(np.asarray(base) + grain, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_video(path: Path, size: tuple[int, int], seconds: float, fps: int, seed: int) -> None:
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.roll(base, 8 * i, axis=1)  # a panning scene
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_dataset(args) -> tuple[Path, Path]:
    """(records file of all samples, records file of the image samples); media under args.workdir."""
    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    size = tuple(int(v) for v in args.image_size.split("x"))
    video_size = tuple(int(v) for v in args.video_size.split("x"))
    start = time.perf_counter()
    for k in range(args.num_images):
        if not (folder / f"img_{k}.jpg").exists():
            write_image(folder / f"img_{k}.jpg", size, seed=k)
    for k in range(args.num_videos):
        if not (folder / f"clip_{k}.mp4").exists():
            write_video(folder / f"clip_{k}.mp4", video_size, args.video_seconds, args.video_fps, seed=k)
    rng = random.Random(0)
    records = []
    for k in range(args.num_images):
        images = [f"img_{k}.jpg"] + ([f"img_{(k + 1) % args.num_images}.jpg"] if rng.random() < 0.1 else [])
        question = "\n".join(["<image>"] * len(images)) + "\n" + _words(rng, 20, 200) + "?"
        records.append({"id": f"i{k}", "image": images if len(images) > 1 else images[0], "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": _words(rng, 20, 200) + "."}]})
    image_records = list(records)
    for k in range(args.num_videos):
        records.append({"id": f"v{k}", "video": f"clip_{k}.mp4", "conversations": [
            {"from": "human", "value": "<video>\n" + _words(rng, 20, 100) + "?"},
            {"from": "gpt", "value": _words(rng, 20, 200) + "."}]})
    rng.shuffle(records)
    paths = folder / "train.json", folder / "images.json"
    paths[0].write_text(json.dumps(records))
    paths[1].write_text(json.dumps(image_records))
    print(f"data: {len(records)} samples ({args.num_images} JPEGs {args.image_size}, {args.num_videos} mp4 clips "
          f"{args.video_size} {args.video_seconds}s@{args.video_fps}fps) in {folder} "
          f"({time.perf_counter() - start:.1f}s)")
    return paths


def load_processor(args):
    if args.processor:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(args.processor)
    from vltrain.tiny import build_tiny_processor

    return build_tiny_processor(args.model_type)


def data_config(args, path: Path, num_workers: int):
    from vltrain.config import DataConfig

    cfg = DataConfig(train_path=str(path), image_folder=str(path.parent), num_workers=num_workers, packing=True,
                     max_seq_length=args.max_seq_length, max_tokens_per_batch=args.max_tokens_per_batch,
                     image_max_pixels=args.image_max_pixels, video_max_pixels=args.video_max_pixels)
    cfg.validate()
    return cfg


def dataset(args, processor, cfg):
    from vltrain.data.dataset import SFTDataset
    from vltrain.data.media import MediaOptions
    from vltrain.families import family_spec

    media = MediaOptions.from_config(cfg, image_factor=family_spec(args.model_type).image_factor)
    return SFTDataset(cfg.train_path, processor, media, max_seq_length=cfg.max_seq_length,
                      image_folder=cfg.image_folder)


def run_loader(args, processor, model_config, path: Path, num_workers: int) -> dict:
    from vltrain.data.loader import build_loader

    cfg = data_config(args, path, num_workers)
    loader = build_loader(dataset(args, processor, cfg), cfg, processor, model_config,
                          micro_batch_size=args.micro_batch_size, shuffle=True, seed=0)
    start = time.perf_counter()
    first = None
    num_samples = num_tokens = 0
    for _ in range(args.epochs):
        for batch in loader:
            if first is None:  # worker start-up and the first batch are not steady-state delivery
                first = time.perf_counter()
                continue
            num_samples += len(batch["id"])
            num_tokens += batch["input_ids"].numel()
    end = time.perf_counter()
    seconds = max(end - first, 1e-9)
    return {"num_workers": num_workers, "first_batch_s": first - start, "samples_per_s": num_samples / seconds,
            "tokens_per_s": num_tokens / seconds, "num_samples": num_samples, "tokens_per_sample": num_tokens /
            max(num_samples, 1)}


def compare_lengths(args, processor, image_path: Path) -> None:
    """The token-budget length pass over the image records: header estimate vs encoding, both on one process."""
    from vltrain.data.packing import example_lengths

    ds = dataset(args, processor, data_config(args, image_path, 0))
    start = time.perf_counter()
    estimated = example_lengths(ds)
    middle = time.perf_counter()
    encoded = example_lengths(ds, estimate=False)
    end = time.perf_counter()
    same = "equal" if estimated == encoded else f"DIFFER at {sum(a != b for a, b in zip(estimated, encoded))} samples"
    print(f"length pass over {len(ds)} image samples ({sum(encoded) / len(ds):.0f} tokens each on average): "
          f"estimate {middle - start:.2f}s ({(middle - start) / len(ds) * 1e3:.2f} ms/sample), encode "
          f"{end - middle:.2f}s ({(end - middle) / len(ds) * 1e3:.1f} ms/sample): "
          f"{(end - middle) / (middle - start):.0f}x faster; lengths {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_type", default="qwen2_5_vl", help="family (vltrain.families); the tiny processor's")
    parser.add_argument("--processor", default=None, help="a checkpoint folder whose processor to use")
    parser.add_argument("--workers", default="0,1,2,4", help="comma-separated num_workers values")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vltrain_bench_data"))
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--num_videos", type=int, default=20)
    parser.add_argument("--image_size", default="1280x960")
    parser.add_argument("--video_size", default="640x360")
    parser.add_argument("--video_seconds", type=float, default=4.0)
    parser.add_argument("--video_fps", type=int, default=8)
    parser.add_argument("--image_max_pixels", type=int, default=None, help="data.image_max_pixels (None: 1280x960 "
                        "keeps its size, ~1,560 tokens with patch 14)")
    parser.add_argument("--video_max_pixels", type=int, default=None)
    parser.add_argument("--max_seq_length", type=int, default=8192)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--max_tokens_per_batch", type=int, default=None, help="token budget (None: micro_batch_size)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--gpu_tokens_per_s", type=float, default=None, help="tokens/s training consumes")
    parser.add_argument("--lengths_only", action="store_true", help="only the estimate-vs-encode length pass")
    parser.add_argument("--no_lengths", action="store_true", help="skip the estimate-vs-encode length pass")
    parser.add_argument("--out", default=None, help="also write the rows (and the settings) to this JSON file")
    args = parser.parse_args()

    import os

    import torch

    from vltrain.tiny import tiny_config

    train_path, image_path = write_dataset(args)
    processor = load_processor(args)
    if args.processor:  # packing needs only the config (rope settings, special token ids)
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(args.processor)
    else:
        model_config = tiny_config(args.model_type)
    print(f"processor {args.processor or 'tiny:' + args.model_type}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, micro-batch {args.max_tokens_per_batch or args.micro_batch_size}"
          f"{' tokens' if args.max_tokens_per_batch else ' samples'}, packing")
    if not args.no_lengths:
        compare_lengths(args, processor, image_path)
    if args.lengths_only:
        return
    rows = [run_loader(args, processor, model_config, train_path, int(w)) for w in args.workers.split(",")]
    header = f"{'workers':>7} {'first batch s':>13} {'samples/s':>10} {'tokens/s':>10} {'tokens/sample':>13}"
    if args.gpu_tokens_per_s:
        header += f" {'delivered/consumed':>18}"
    print(header)
    for row in rows:
        line = (f"{row['num_workers']:>7} {row['first_batch_s']:>13.2f} {row['samples_per_s']:>10.1f} "
                f"{row['tokens_per_s']:>10.0f} {row['tokens_per_sample']:>13.0f}")
        if args.gpu_tokens_per_s:
            line += f" {row['tokens_per_s'] / args.gpu_tokens_per_s:>18.2f}"
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "argv": " ".join(sys.argv), "rows": rows,
                                              "gpu_tokens_per_s": args.gpu_tokens_per_s}, indent=1))


if __name__ == "__main__":
    main()
