"""Shared fixtures: tiny offline models, and small datasets written to a temp folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"]
REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_image(path: Path, size=(64, 64), seed=0, colour=None) -> Path:
    rng = np.random.default_rng(seed)
    if colour is None:
        array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    else:
        array = np.full((size[1], size[0], 3), colour, dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


def write_video(path: Path, num_frames=8, fps=4, size=(64, 64)) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(num_frames):
            array = np.full((size[1], size[0], 3), (i * 30) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def media_dir(tmp_path) -> Path:
    """A folder with a.png, b.png (different sizes) and clip.mp4."""
    write_image(tmp_path / "a.png", (64, 64), seed=1)
    write_image(tmp_path / "b.png", (96, 64), seed=2)
    write_video(tmp_path / "clip.mp4")
    return tmp_path


def mixed_records() -> list[dict]:
    """Text-only, single-image, multi-image (two turns) and video samples in the upstream format."""
    return [
        {"id": "text", "conversations": [
            {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello there"}]},
        {"id": "img", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "multi", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>\nFirst?"}, {"from": "gpt", "value": "a circle"},
            {"from": "human", "value": "<image>\nAnd this one?"}, {"from": "gpt", "value": "a square"}]},
        {"id": "vid", "video": "clip.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat is going on in this video?"},
            {"from": "gpt", "value": "A man is walking down the road."}]},
    ]


@pytest.fixture
def mixed_data(media_dir) -> Path:
    path = media_dir / "train.json"
    path.write_text(json.dumps(mixed_records()))
    return path
