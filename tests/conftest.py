"""Shared fixtures: tiny offline models, and small datasets written to a temp folder."""

from __future__ import annotations

import copy
import functools
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


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads cost more than they give (on a shared 2-core machine two threads spin
    against other processes and run 10-50x slower, measured). Restored after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerator state is a process-wide singleton; each test builds its own."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def sft_config(tmp_path, model_type, train_path, **overrides):
    """A small SFT config for tests (no workers, no trackers)."""
    from vltrain.config import SFTConfig, load_config

    base = {
        "model.name_or_path": f"tiny:{model_type}", "model.dtype": "float32", "model.attn_implementation": "sdpa",
        "data.train_path": str(train_path), "data.image_folder": str(Path(train_path).parent),
        "data.num_workers": 0, "data.max_seq_length": 1024, "data.nframes": 4,
        "data.image_max_pixels": 64 * 64 * 2, "data.video_max_pixels": 64 * 64,
        "optim.lr": 3e-3, "optim.warmup_steps": 0, "optim.scheduler": "constant",
        "train.output_dir": str(tmp_path / "out"), "train.report_to": "none", "train.max_steps": 8,
        "train.micro_batch_size": 2, "train.log_every": 1,
    }
    base.update(overrides)
    return load_config(SFTConfig, None, [f"{k}={v}" for k, v in base.items()])


@functools.lru_cache(maxsize=None)
def _cached_tiny(model_type):
    from vltrain.tiny import build_tiny

    model, processor = build_tiny(model_type)
    return model.eval(), processor


def stock_and_copy(model_type, dtype=torch.float32, device="cpu"):
    """(stock, to-be-patched) copies of a cached tiny model in eval mode, and its processor: kernel parity tests
    patch the second and compare it with the first."""
    model, processor = _cached_tiny(model_type)
    stock = copy.deepcopy(model).to(device=device, dtype=dtype)
    return stock, copy.deepcopy(stock), processor
