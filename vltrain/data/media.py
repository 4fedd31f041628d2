"""Load images and videos for training, with the upstream (2U1/Qwen2-VL-Finetune) option semantics.

    opts = MediaOptions.from_config(cfg.data, image_factor=28)
    image = load_image(resolve_media_path("cat.jpg", cfg.data.image_folder), opts)
    frames, metadata = load_video("clip.mp4", opts)  # uint8 (T, 3, H, W), transformers VideoMetadata

Sizing and frame counts are qwen-vl-utils' own math (`smart_resize`, `smart_nframes`, its default pixel
bounds); decoding is done here with PyAV (default) or decord (`VLTRAIN_VIDEO_BACKEND=decord`), because
qwen-vl-utils falls back to `torchvision.io.read_video`, which no longer exists.

Deviations from qwen-vl-utils, all deliberate:
- Frames stay uint8 (qwen-vl-utils returns float after resizing); resizing is bicubic with antialias.
- A `*_max_pixels` below the default minimum lowers the minimum too, instead of failing an assert.
- `nframes` larger than the video's frame count samples every frame (rounded down to even) instead of
  raising; a video with fewer than 2 frames is a `MediaError`.
- A frame folder / frame list is sampled down to `nframes` when that is set (otherwise every frame is
  used, padded to an even count by repeating the last one) and its frames are assumed `fps` apart.

`metadata.frames_indices[i] / metadata.fps` is the source timestamp of frame i: Qwen3-VL writes it into
the prompt, so the indices are the decoded frames' positions in the source, not positions in the sample.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image
from qwen_vl_utils import vision_process as qvu
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from transformers.video_utils import VideoMetadata

from vltrain.config import MediaConfig

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class MediaError(ValueError):
    """A media file is missing, unreadable or unusable; the message names the file."""


@dataclass
class MediaOptions(MediaConfig):
    """The media settings of `data.*` plus the model's patch factor."""

    image_factor: int = 28  # patch_size*2: 28 for qwen2/2.5-vl, 32 for qwen3-vl/3.5

    @classmethod
    def from_config(cls, data_cfg: MediaConfig, image_factor: int) -> "MediaOptions":
        names = [f.name for f in fields(MediaConfig)]
        return cls(image_factor=image_factor, **{name: getattr(data_cfg, name) for name in names})


def resolve_media_path(ref: str, image_folder: str | None) -> str:
    """Absolute paths, URLs (http, https, file) and data URIs are kept; relative paths join `image_folder`."""
    if os.path.isabs(ref) or re.match(r"^(https?|file)://", ref) or ref.startswith("data:") or not image_folder:
        return ref
    return os.path.join(image_folder, ref)


# ------------------------------------------------------------------------------------------ images
def load_image(ref: str, opts: MediaOptions) -> Image.Image:
    """An RGB image resized to multiples of `image_factor` within the pixel bounds (or to the resized size)."""
    factor = opts.image_factor
    bounds = _pixel_bounds(opts.image_min_pixels, opts.image_max_pixels, qvu.IMAGE_MIN_TOKEN_NUM * factor**2)
    if opts.image_resized_width is not None and opts.image_resized_height is not None:
        bounds = {"resized_width": opts.image_resized_width, "resized_height": opts.image_resized_height}
    if ref.startswith(("http://", "https://", "data:image")):
        try:
            return qvu.fetch_image({"image": ref, **bounds}, image_patch_size=factor // 2)
        except Exception as e:  # a failed download, a bad data URI, an extreme aspect ratio
            raise MediaError(f"cannot load image {_short(ref)}: {e}") from e
    image = qvu.to_rgb(_open_image(ref))  # RGBA goes onto white, as in qwen-vl-utils
    if "resized_width" in bounds:
        height, width = _fit(ref, bounds["resized_height"], bounds["resized_width"], factor)
    else:
        height, width = _fit(ref, image.height, image.width, factor, **bounds)
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BICUBIC)


def _fit(ref, height: int, width: int, factor: int, min_pixels: int | None = None, max_pixels: int | None = None):
    """qwen-vl-utils' `smart_resize`, but no side below `factor` (it floors a thin side to 0; transformers doesn't)."""
    try:
        height, width = qvu.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:  # an extreme aspect ratio
        raise MediaError(f"cannot size {_short(str(ref))}: {e}") from e
    return max(height, factor), max(width, factor)


def _open_image(ref: str) -> Image.Image:
    path = ref.removeprefix("file://")
    if not os.path.isfile(path):
        raise MediaError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except Exception as e:
        raise MediaError(f"cannot decode image {path}: {e}") from e


def _pixel_bounds(min_pixels: int | None, max_pixels: int | None, default_min: int) -> dict:
    if min_pixels is None and max_pixels is not None:
        min_pixels = min(default_min, max_pixels)
    return {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}


def _short(ref: str) -> str:
    return ref if len(ref) <= 120 else ref[:100] + "...(data URI)"


# ------------------------------------------------------------------------------------------ videos
def load_video(ref: str | list[str], opts: MediaOptions) -> tuple[torch.Tensor, VideoMetadata]:
    """Sampled frames, uint8 (T, 3, H, W) with T even, and the metadata that places them in the source.

    `ref` is a video file, a folder of frame images, or a list of frame image paths.
    """
    if opts.fps is not None and opts.nframes is not None:
        raise MediaError(f"cannot load video {ref}: set fps or nframes, not both")
    if isinstance(ref, (list, tuple)) or os.path.isdir(ref):
        frames, metadata = _load_frame_list(ref, opts)
    else:
        path = ref.removeprefix("file://")
        if not os.path.isfile(path):
            raise MediaError(f"video file not found: {path}")
        frames, metadata = _decode_video_file(path, opts)
    height, width = _video_size(ref, frames.shape[2], frames.shape[3], len(frames), opts)
    if (height, width) != tuple(frames.shape[2:]):
        frames = TF.resize(frames, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    metadata.width, metadata.height = width, height
    return frames, metadata


def _num_frames(path: str, total_frames: int, video_fps: float, opts: MediaOptions) -> int:
    if total_frames < qvu.FRAME_FACTOR:
        raise MediaError(f"video {path} has {total_frames} decodable frame(s); at least {qvu.FRAME_FACTOR} are needed")
    if opts.nframes is not None:
        requested = qvu.round_by_factor(opts.nframes, qvu.FRAME_FACTOR)
        return min(requested, qvu.floor_by_factor(total_frames, qvu.FRAME_FACTOR))
    return qvu.smart_nframes({"fps": opts.fps or qvu.FPS}, total_frames=total_frames, video_fps=video_fps)


def _sample_indices(path: str, total_frames: int, video_fps: float, opts: MediaOptions) -> list[int]:
    num_frames = _num_frames(path, total_frames, video_fps, opts)
    return torch.linspace(0, total_frames - 1, num_frames).round().long().tolist()


def _decode_video_file(path: str, opts: MediaOptions) -> tuple[torch.Tensor, VideoMetadata]:
    backend = os.environ.get("VLTRAIN_VIDEO_BACKEND", "pyav")
    if backend not in ("pyav", "decord"):
        raise ValueError(f"VLTRAIN_VIDEO_BACKEND must be 'pyav' or 'decord', got {backend!r}")
    try:
        if backend == "decord":
            frames, indices, total_frames, video_fps = _decode_decord(path, opts)
        else:
            frames, indices, total_frames, video_fps = _decode_pyav(path, opts)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"cannot decode video {path}: {e}") from e
    metadata = VideoMetadata(
        total_num_frames=total_frames,
        fps=video_fps,
        duration=total_frames / video_fps,
        video_backend=backend,
        frames_indices=indices,
    )
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous(), metadata


def _decode_pyav(path: str, opts: MediaOptions) -> tuple[list[np.ndarray], list[int], int, float]:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise MediaError(f"video {path} has no video stream")
        stream = container.streams.video[0]
        video_fps = float(stream.average_rate or stream.guessed_rate or 0)
        # The container's frame count; without one, count packets (demuxing is cheap, decoding is not).
        total_frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
    if video_fps <= 0:
        raise MediaError(f"video {path} has no frame rate")
    while True:
        indices = _sample_indices(path, total_frames, video_fps, opts)
        wanted, frames, num_decoded = set(indices), {}, 0
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for num_decoded, frame in enumerate(container.decode(stream), start=1):
                if num_decoded - 1 in wanted:
                    frames[num_decoded - 1] = frame.to_ndarray(format="rgb24")
                if num_decoded - 1 >= indices[-1]:
                    break
        if len(frames) == len(wanted):
            return [frames[i] for i in indices], indices, total_frames, video_fps
        total_frames = num_decoded  # the header promised more frames than the stream holds: resample


def _decode_decord(path: str, opts: MediaOptions) -> tuple[list[np.ndarray], list[int], int, float]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    total_frames, video_fps = len(reader), float(reader.get_avg_fps())
    indices = _sample_indices(path, total_frames, video_fps, opts)
    return list(reader.get_batch(indices).asnumpy()), indices, total_frames, video_fps


def _load_frame_list(ref: str | list[str], opts: MediaOptions) -> tuple[torch.Tensor, VideoMetadata]:
    if isinstance(ref, (list, tuple)):
        paths, name = list(ref), f"frame list starting {ref[0] if ref else '(empty)'}"
    else:
        natural = lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]  # frame_2 < frame_10
        names = sorted((f for f in os.listdir(ref) if f.lower().endswith(FRAME_EXTENSIONS)), key=natural)
        paths, name = [os.path.join(ref, f) for f in names], f"frame folder {ref}"
    if not paths:
        raise MediaError(f"{name} holds no frames (looked for {', '.join(FRAME_EXTENSIONS)})")
    video_fps = opts.fps or qvu.FPS
    if opts.nframes is not None:
        indices = _sample_indices(name, len(paths), video_fps, opts)
    else:  # every frame, padded to an even count with the last one (as qwen-vl-utils does)
        indices = list(range(len(paths))) + [len(paths) - 1] * (len(paths) % qvu.FRAME_FACTOR)
    images = {i: _open_image(paths[i]).convert("RGB") for i in set(indices)}
    size = images[indices[0]].size
    frames = torch.stack([torch.from_numpy(np.array(images[i].resize(size))) for i in indices]).permute(0, 3, 1, 2)
    metadata = VideoMetadata(
        total_num_frames=len(paths),
        fps=video_fps,
        duration=len(paths) / video_fps,
        video_backend="frames",
        frames_indices=indices,
    )
    return frames.contiguous(), metadata


def _video_size(ref, height: int, width: int, num_frames: int, opts: MediaOptions) -> tuple[int, int]:
    """qwen-vl-utils' `fetch_video` sizing: per-frame pixels also shrink when there are many frames."""
    factor = opts.image_factor
    if opts.video_resized_width is not None and opts.video_resized_height is not None:
        return _fit(ref, opts.video_resized_height, opts.video_resized_width, factor)
    bounds = _pixel_bounds(opts.video_min_pixels, opts.video_max_pixels, qvu.VIDEO_MIN_TOKEN_NUM * factor**2)
    min_pixels = bounds.get("min_pixels", qvu.VIDEO_MIN_TOKEN_NUM * factor**2)
    total_pixels = qvu.MODEL_SEQ_LEN * factor**2 * 0.9
    limit = min(qvu.VIDEO_MAX_TOKEN_NUM * factor**2, total_pixels / num_frames * qvu.FRAME_FACTOR)
    limit = max(limit, int(min_pixels * 1.05))
    max_pixels = min(bounds.get("max_pixels", limit), limit)
    return _fit(ref, height, width, factor, min_pixels=min_pixels, max_pixels=max_pixels)
