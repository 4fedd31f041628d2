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
- Sizes come from the header and are checked before decoding: an image (or video frame) that would decode to
  more than `PIL.Image.MAX_IMAGE_PIXELS` is a `MediaError` (a skip), PIL's DecompressionBombError included; a JPEG
  much larger than its target is decoded reduced (`Image.draft`, down to twice the target per side), so a huge
  JPEG never decodes at full size. `image_size` is the one sizing rule (vltrain.data.lengths uses it too).
- A frame folder / frame list is sampled down to `nframes` when that is set (otherwise every frame is
  used, padded to an even count by repeating the last one) and its frames are assumed `fps` apart.

`metadata.frames_indices[i] / metadata.fps` is the source timestamp of frame i: Qwen3-VL writes it into
the prompt, so the indices are the decoded frames' positions in the source, not positions in the sample.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image, JpegImagePlugin
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
# Sizes are read from the header and checked before any pixel is decoded. The most pixels one image or video frame
# may decode to is PIL's own decompression-bomb limit, `Image.MAX_IMAGE_PIXELS` (read at every call: raise it, or
# set it to None, to change both); a JPEG counts after its DCT-domain reduction (`Image.draft`: 1/2, 1/4 or 1/8 per
# side), so a 20000x20000 JPEG loads at 2500x2500 when the pixel bounds are small, while a PNG that size is refused.
JPEG_MAGIC = b"\xff\xd8\xff"
REDUCING_GAP = 2  # a JPEG is reduced only down to twice the target size per side, as PIL's `thumbnail` does


def image_size(ref: str, opts: MediaOptions) -> tuple[int, int]:
    """(height, width) that `load_image` gives the local image `ref`, read from its header alone (no pixel decoded):
    the one sizing rule, also used by the length estimates (vltrain.data.lengths). MediaError names the file when it
    is missing, unreadable, too large to decode or of a size the resize rule refuses."""
    with _open_header(local_media_path(ref)) as image:
        return _target_size(ref, image.height, image.width, opts)


def image_header_size(path: str) -> tuple[int, int]:
    """(height, width) of the local image `path`, from its header (no pixel decoded)."""
    with _open_header(local_media_path(path)) as image:
        return image.height, image.width


def load_image(ref: str, opts: MediaOptions) -> Image.Image:
    """An RGB image resized to multiples of `image_factor` within the pixel bounds (or to the resized size)."""
    if ref.startswith(("http://", "https://", "data:image")):
        factor = opts.image_factor
        bounds = _pixel_bounds(opts.image_min_pixels, opts.image_max_pixels, qvu.IMAGE_MIN_TOKEN_NUM * factor**2)
        if opts.image_resized_width is not None and opts.image_resized_height is not None:
            bounds = {"resized_width": opts.image_resized_width, "resized_height": opts.image_resized_height}
        try:
            return qvu.fetch_image({"image": ref, **bounds}, image_patch_size=factor // 2)
        except Exception as e:  # a failed download, a bad data URI, an extreme aspect ratio
            raise MediaError(f"cannot load image {_short(ref)}: {e}") from e
    path = local_media_path(ref)
    with _open_header(path) as image:
        height, width = _target_size(ref, image.height, image.width, opts)
        image = _decode(image, path, (height, width))
    image = qvu.to_rgb(image)  # RGBA goes onto white, as in qwen-vl-utils
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BICUBIC)


def _target_size(ref, height: int, width: int, opts: MediaOptions) -> tuple[int, int]:
    """load_image's rule: data.image_resized_height/width, else smart_resize within the pixel bounds."""
    factor = opts.image_factor
    if opts.image_resized_width is not None and opts.image_resized_height is not None:
        return _fit(ref, opts.image_resized_height, opts.image_resized_width, factor)
    bounds = _pixel_bounds(opts.image_min_pixels, opts.image_max_pixels, qvu.IMAGE_MIN_TOKEN_NUM * factor**2)
    return _fit(ref, height, width, factor, **bounds)


def _fit(ref, height: int, width: int, factor: int, min_pixels: int | None = None, max_pixels: int | None = None):
    """qwen-vl-utils' `smart_resize`, but no side below `factor` (it floors a thin side to 0; transformers doesn't)."""
    try:
        height, width = qvu.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:  # an extreme aspect ratio
        raise MediaError(f"cannot size {_short(str(ref))}: {e}") from e
    return max(height, factor), max(width, factor)


def local_media_path(ref: str, kind: str = "image") -> str:
    """The local file that `ref` names (a `file://` prefix dropped); MediaError for a URL, a data URI or a missing
    file (`kind` names what it is in the message)."""
    if re.match(r"^(https?)://", ref) or ref.startswith("data:"):
        raise MediaError(f"{kind} {_short(ref)} is not a local file: its size has no header to read here")
    path = ref.removeprefix("file://")
    if not os.path.isfile(path):
        raise MediaError(f"{kind} file not found: {path}")
    return path


def _open_header(path: str) -> Image.Image:
    """The image at `path` opened lazily (header read, no pixel decoded). JPEGs skip PIL's decompression-bomb check
    here because `_decode` applies the limit to the size they decode to; other formats keep it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(JPEG_MAGIC))
        if magic == JPEG_MAGIC:
            return JpegImagePlugin.JpegImageFile(path)
        with warnings.catch_warnings():  # between 1x and 2x the limit PIL only warns; `_decode` refuses it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as e:  # above 2x the limit
        raise MediaError(f"image {path} is too large to decode: {e}") from e
    except Exception as e:  # not an image, an empty file, an unreadable header
        raise MediaError(f"cannot decode image {path}: {e}") from e


def _decode(image: Image.Image, path: str, size: tuple[int, int] | None) -> Image.Image:
    """The pixels of `image` (opened by `_open_header`) as a detached copy; a JPEG reduced in the DCT domain towards
    `size` (height, width) when given; MediaError when they would exceed `Image.MAX_IMAGE_PIXELS`."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    try:
        if size is not None and image.format == "JPEG":
            request = (size[1] * REDUCING_GAP, size[0] * REDUCING_GAP)
            if limit is not None and _jpeg_pixels(width, height, request) > limit:
                request = (size[1], size[0])  # the largest reduction that still gives the target size
            image.draft(image.mode, request)
        decoded = image.size[0] * image.size[1]
        if limit is not None and decoded > limit:
            raise MediaError(f"image {path} is {width}x{height}: decoding it takes {decoded:,} pixels, more than "
                             f"PIL.Image.MAX_IMAGE_PIXELS={limit:,} allows")
        image.load()
        return image.copy()
    except MediaError:
        raise
    except Exception as e:  # truncated or corrupt pixel data
        raise MediaError(f"cannot decode image {path}: {e}") from e


def _jpeg_pixels(width: int, height: int, request: tuple[int, int]) -> int:
    """Pixels JPEG `draft(mode, request)` decodes a width x height image to (PIL's rule: the largest reduction of
    1, 2, 4, 8 that keeps at least `request` (width, height))."""
    fit = min(width // max(1, request[0]), height // max(1, request[1]))
    scale = next((s for s in (8, 4, 2) if fit >= s), 1)
    return -(-width // scale) * -(-height // scale)


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
        frames, metadata, (height, width) = _load_frame_list(ref, opts)
    else:
        path = ref.removeprefix("file://")
        if not os.path.isfile(path):
            raise MediaError(f"video file not found: {path}")
        frames, metadata = _decode_video_file(path, opts)
        height, width = frames.shape[2:]
    height, width = video_size(ref, height, width, len(frames), opts)
    if (height, width) != tuple(frames.shape[2:]):
        frames = TF.resize(frames, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    metadata.width, metadata.height = width, height
    return frames, metadata


def frame_paths(ref: str | list[str]) -> list[str]:
    """The frames of a frame list (as given) or of a frame folder (its images in natural order: frame_2 < frame_10)."""
    if isinstance(ref, (list, tuple)):
        return list(ref)
    natural = lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
    names = sorted((f for f in os.listdir(ref) if f.lower().endswith(FRAME_EXTENSIONS)), key=natural)
    return [os.path.join(ref, f) for f in names]


def _num_frames(path: str, total_frames: int, video_fps: float, opts: MediaOptions) -> int:
    if total_frames < qvu.FRAME_FACTOR:
        raise MediaError(f"video {path} has {total_frames} decodable frame(s); at least {qvu.FRAME_FACTOR} are needed")
    if opts.nframes is not None:
        requested = qvu.round_by_factor(opts.nframes, qvu.FRAME_FACTOR)
        return min(requested, qvu.floor_by_factor(total_frames, qvu.FRAME_FACTOR))
    return qvu.smart_nframes({"fps": opts.fps or qvu.FPS}, total_frames=total_frames, video_fps=video_fps)


def sample_frame_indices(path: str, total_frames: int, video_fps: float, opts: MediaOptions) -> list[int]:
    """The source frames a video of `total_frames` at `video_fps` is sampled to (data.fps / data.nframes)."""
    num_frames = _num_frames(path, total_frames, video_fps, opts)
    return torch.linspace(0, total_frames - 1, num_frames).round().long().tolist()


def frame_list_indices(name: str, num_paths: int, opts: MediaOptions) -> list[int]:
    """The frames of a frame list / folder that are used: sampled down to data.nframes when set, else every frame,
    padded to an even count with the last one (as qwen-vl-utils does)."""
    if not num_paths:
        raise MediaError(f"{name} holds no frames (looked for {', '.join(FRAME_EXTENSIONS)})")
    if opts.nframes is not None:
        return sample_frame_indices(name, num_paths, opts.fps or qvu.FPS, opts)
    return list(range(num_paths)) + [num_paths - 1] * (num_paths % qvu.FRAME_FACTOR)


def video_header(path: str) -> tuple[int, float, int, int]:
    """(frames, fps, height, width) of a video file, from its container (no frame decoded): what the decoder samples
    from (the frame count and rate of decord's index when VLTRAIN_VIDEO_BACKEND=decord). MediaError names the file
    when there is no video stream, no frame rate or size, or frames larger than `Image.MAX_IMAGE_PIXELS`."""
    backend = _video_backend()
    try:
        import av

        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"video {path} has no video stream")
            stream = container.streams.video[0]
            video_fps = float(stream.average_rate or stream.guessed_rate or 0)
            height, width = stream.codec_context.height, stream.codec_context.width
            # The container's frame count; without one, count packets (demuxing is cheap, decoding is not).
            total_frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if backend == "decord":
            import decord

            reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            total_frames, video_fps = len(reader), float(reader.get_avg_fps())
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"cannot decode video {path}: {e}") from e
    if video_fps <= 0:
        raise MediaError(f"video {path} has no frame rate")
    if not height or not width:
        raise MediaError(f"video {path} has no frame size in its header")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > limit:
        raise MediaError(f"video {path} has {width}x{height} frames, more pixels than "
                         f"PIL.Image.MAX_IMAGE_PIXELS={limit:,} allows per frame")
    return total_frames, video_fps, height, width


def _video_backend() -> str:
    backend = os.environ.get("VLTRAIN_VIDEO_BACKEND", "pyav")
    if backend not in ("pyav", "decord"):
        raise ValueError(f"VLTRAIN_VIDEO_BACKEND must be 'pyav' or 'decord', got {backend!r}")
    return backend


def _decode_video_file(path: str, opts: MediaOptions) -> tuple[torch.Tensor, VideoMetadata]:
    backend = _video_backend()
    total_frames, video_fps, _, _ = video_header(path)
    try:
        if backend == "decord":
            frames, indices = _decode_decord(path, total_frames, video_fps, opts)
        else:
            frames, indices, total_frames = _decode_pyav(path, total_frames, video_fps, opts)
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


def _decode_pyav(path: str, total_frames: int, video_fps: float,
                 opts: MediaOptions) -> tuple[list[np.ndarray], list[int], int]:
    import av

    while True:
        indices = sample_frame_indices(path, total_frames, video_fps, opts)
        wanted, frames, num_decoded = set(indices), {}, 0
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for num_decoded, frame in enumerate(container.decode(stream), start=1):
                if num_decoded - 1 in wanted:
                    # threads=1: with PyAV's default (0: a swscale thread pool per call, one thread per CPU)
                    # bench_sft.py's loop run stalled here in a forked DataLoader worker on the 16-core H200
                    # machine (2026-12-02, stack in benchmarks/RESULTS.md); with 1 it ran. The workers are
                    # the parallelism.
                    frames[num_decoded - 1] = frame.to_ndarray(format="rgb24", threads=1)
                if num_decoded - 1 >= indices[-1]:
                    break
        if len(frames) == len(wanted):
            return [frames[i] for i in indices], indices, total_frames
        total_frames = num_decoded  # the header promised more frames than the stream holds: resample


def _decode_decord(path: str, total_frames: int, video_fps: float,
                   opts: MediaOptions) -> tuple[list[np.ndarray], list[int]]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    indices = sample_frame_indices(path, total_frames, video_fps, opts)
    return list(reader.get_batch(indices).asnumpy()), indices


def _load_frame_list(ref: str | list[str], opts: MediaOptions) -> tuple[torch.Tensor, VideoMetadata, tuple[int, int]]:
    """(frames, metadata, (height, width) of the first used frame's header: what the video is sized from)."""
    paths = frame_paths(ref)
    name = f"frame list starting {ref[0] if ref else '(empty)'}" if isinstance(ref, (list, tuple)) else \
        f"frame folder {ref}"
    indices = frame_list_indices(name, len(paths), opts)
    source = image_header_size(paths[indices[0]])
    target = video_size(name, *source, len(indices), opts)
    images = {}
    for i in set(indices):
        path = local_media_path(paths[i])
        with _open_header(path) as image:
            images[i] = _decode(image, path, target).convert("RGB")
    size = images[indices[0]].size
    frames = torch.stack([torch.from_numpy(np.array(images[i].resize(size))) for i in indices]).permute(0, 3, 1, 2)
    video_fps = opts.fps or qvu.FPS
    metadata = VideoMetadata(
        total_num_frames=len(paths),
        fps=video_fps,
        duration=len(paths) / video_fps,
        video_backend="frames",
        frames_indices=indices,
    )
    return frames.contiguous(), metadata, source


def video_size(ref, height: int, width: int, num_frames: int, opts: MediaOptions) -> tuple[int, int]:
    """(height, width) the frames of a `height` x `width` video of `num_frames` sampled frames are resized to:
    qwen-vl-utils' `fetch_video` sizing, where per-frame pixels also shrink when there are many frames."""
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
