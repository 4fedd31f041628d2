"""Helpers shared by the vision kernel tests (test_vision_positions, test_vision_varlen, test_kernels): the
vision inputs and SFT batch they run, the tower's forward + backward under a fixed weighting, the relative error
of the bf16 GPU checks, a benchmark preset's vision tower and a CUDA sync count."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import torch
from PIL import Image

from conftest import REPO
from vltrain.families import family_spec


def vision_inputs(processor):
    """Pixel rows and grid of 2 images of different sizes and an 8-frame video, as ONE vision tower call:
    2 + (8 frames / temporal patch 2) = 6 attention segments of 3 different lengths."""
    from transformers.video_utils import VideoMetadata

    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in ((56, 84), (112, 140))]
    image = processor.image_processor(images=images, return_tensors="pt")
    frames = torch.randint(0, 255, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    metadata = [VideoMetadata(total_num_frames=8, fps=2.0, frames_indices=list(range(8)))]
    video = processor.video_processor(videos=[frames], video_metadata=metadata, do_sample_frames=False,
                                      return_tensors="pt")
    pixels = torch.cat([image["pixel_values"], video["pixel_values_videos"]])
    grid = torch.cat([image["image_grid_thw"], video["video_grid_thw"]])
    assert len({tuple(g) for g in grid.tolist()}) == 3 and grid[-1, 0] > 1  # 3 sizes, a video of several frames
    return pixels, grid


def visual_of(model):
    return model.get_submodule(family_spec(model).vision_module)


def tower_outputs(out) -> list[torch.Tensor]:
    """Every tensor the vision tower returns (Qwen3-VL adds DeepStack features)."""
    return [out.last_hidden_state, out.pooler_output] + list(getattr(out, "deepstack_features", None) or [])


def tower_forward_backward(model, pixels, grid):
    """Tower outputs, and the gradients of the pixels and of every vision parameter under a fixed random
    weighting of all outputs."""
    visual = visual_of(model)
    visual.zero_grad(set_to_none=True)
    pixels = pixels.detach().clone().requires_grad_(True)
    outs = tower_outputs(visual(pixels, grid_thw=grid))
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    loss.backward()
    grads = {"pixel_values": pixels.grad, **{n: p.grad for n, p in visual.named_parameters() if p.grad is not None}}
    return outs, grads


def sft_batch(model_type, processor, media_dir, mixed_data):
    """One padded batch of the mixed SFT records (text, one image, two images of different sizes, a video)
    built by the data layer, as the model takes it."""
    from vltrain.data.dataset import PadCollator, SFTDataset
    from vltrain.data.media import MediaOptions
    from vltrain.progress import model_inputs

    media = MediaOptions(image_factor=family_spec(model_type).image_factor, image_max_pixels=64 * 64 * 2,
                         video_max_pixels=64 * 64, nframes=4)
    dataset = SFTDataset(mixed_data, processor, media, max_seq_length=1024, image_folder=str(media_dir))
    batch = model_inputs(PadCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))]))
    assert {"pixel_values", "pixel_values_videos"} <= batch.keys()
    assert len({tuple(g) for g in batch["image_grid_thw"].tolist()}) == 2  # a.png and b.png differ in size
    return batch


def loss_and_grads(model, batch, **kwargs):
    """(the model's output, the gradient of every parameter that got one) after one backward of its loss."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a, b) -> float:
    """Relative L2 error of `a` against `b`, in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def preset_vision_tower(preset: str, config_cls, model_cls):
    """The vision tower of a benchmarks/bench_sft.py preset (e.g. "qwen3_vl_4b" with Qwen3VLVisionConfig and
    Qwen3VLVisionModel), random weights (seed 0), bf16, on CUDA, sdpa attention."""
    spec = importlib.util.spec_from_file_location("bench_sft", REPO / "benchmarks" / "bench_sft.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = config_cls(**bench.PRESETS[preset]["vision_config"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        return model_cls._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")


def cuda_syncs(fn) -> int:
    """Synchronising CUDA calls made by `fn()`, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
