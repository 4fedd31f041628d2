"""Media loading: sizes, frame sampling, metadata that Qwen3-VL timestamps rely on, and error messages.

    python -m pytest tests/test_media.py -q
"""

import importlib.util
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from vltrain.config import DataConfig
from vltrain.data.media import MediaError, MediaOptions, load_image, load_video, resolve_media_path

NUM_FRAMES, FPS, WIDTH, HEIGHT = 20, 10, 96, 64


def colour(i: int) -> tuple[int, int, int]:
    return (20 + 11 * i, 235 - 11 * i, 128)  # far enough apart to survive yuv420p


def write_video(path, num_frames=NUM_FRAMES, fps=FPS, width=WIDTH, height=HEIGHT, start_encoding=True):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps, options={"qscale": "1"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if start_encoding:
            container.start_encoding()
        for i in range(num_frames):
            frame = np.full((height, width, 3), colour(i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def source_index(frame: torch.Tensor) -> int:
    """Which source frame a decoded (3, H, W) frame shows, by its mean colour."""
    mean = frame.float().mean(dim=(1, 2)).numpy()
    return int(np.argmin([np.abs(mean - colour(i)).sum() for i in range(NUM_FRAMES)]))


def write_png(path, width, height, mode="RGB"):
    Image.new(mode, (width, height), (200, 10, 10, 255)[: len(mode)]).save(path)
    return str(path)


@pytest.fixture
def video(tmp_path):
    return write_video(tmp_path / "clip.mp4")


# ------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("factor, expected", [(28, (224, 140)), (32, (224, 160))])
def test_image_pixel_bounds_and_factor(tmp_path, factor, expected):
    path = write_png(tmp_path / "big.png", 1000, 700)
    image = load_image(path, MediaOptions(image_factor=factor, image_max_pixels=200 * 200))
    assert image.mode == "RGB"
    w, h = image.size
    assert w % factor == 0 and h % factor == 0 and w * h <= 200 * 200
    assert (w, h) == expected  # 1000x700 scaled by sqrt(40000 / 700000), each side floored to the factor

    small = write_png(tmp_path / "small.png", 30, 20)
    w, h = load_image(small, MediaOptions(image_factor=factor, image_min_pixels=300 * 300)).size
    assert w % factor == 0 and h % factor == 0 and w * h >= 300 * 300


def test_image_default_bounds_and_rgba(tmp_path):
    path = write_png(tmp_path / "rgba.png", 10, 10, mode="RGBA")
    image = load_image(path, MediaOptions())
    assert image.mode == "RGB" and image.size == (56, 56)  # qwen-vl-utils' minimum: 4 tokens of 28x28


def test_max_pixels_below_default_min_is_honoured(tmp_path):
    path = write_png(tmp_path / "a.png", 300, 300)
    assert load_image(path, MediaOptions(image_max_pixels=28 * 28)).size == (28, 28)


@pytest.mark.parametrize("factor, expected", [(28, (448, 224)), (32, (448, 224))])
def test_image_resized_width_height_rounded(tmp_path, factor, expected):
    path = write_png(tmp_path / "a.png", 50, 50)
    opts = MediaOptions(image_factor=factor, image_resized_width=450, image_resized_height=230)
    assert load_image(path, opts).size == expected  # round(450/28)*28 = 448, round(230/28)*28 = 224 (same for 32)


def test_image_data_uri(tmp_path):
    import base64

    path = write_png(tmp_path / "a.png", 56, 84)
    uri = "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()
    assert load_image(uri, MediaOptions()).size == (56, 84)


def test_resolve_media_path(tmp_path):
    assert resolve_media_path("a/b.png", str(tmp_path)) == os.path.join(str(tmp_path), "a/b.png")
    assert resolve_media_path("/abs/b.png", str(tmp_path)) == "/abs/b.png"
    assert resolve_media_path("https://x.org/b.png", str(tmp_path)) == "https://x.org/b.png"
    assert resolve_media_path("data:image/png;base64,AAAA", str(tmp_path)) == "data:image/png;base64,AAAA"
    assert resolve_media_path("b.png", None) == "b.png"


def test_missing_and_corrupt_image(tmp_path):
    missing = str(tmp_path / "nope.png")
    with pytest.raises(MediaError, match="nope.png"):
        load_image(missing, MediaOptions())
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(MediaError, match="corrupt.png"):
        load_image(str(corrupt), MediaOptions())


def test_options_from_config():
    cfg = DataConfig(
        train_path="x.json", video_max_pixels=1234, fps=1.0, image_resized_width=448, image_resized_height=448
    )
    opts = MediaOptions.from_config(cfg, image_factor=32)
    assert opts == MediaOptions(
        image_factor=32, video_max_pixels=1234, fps=1.0, image_resized_width=448, image_resized_height=448
    )


# ------------------------------------------------------------------------------------------ videos
def assert_timestamps_match_frames(frames, metadata):
    """Qwen3-VL's prompt timestamps are frames_indices[i] / fps: each frame must be that source frame."""
    assert [source_index(f) for f in frames] == list(metadata.frames_indices)
    assert metadata.timestamps == [i / FPS for i in metadata.frames_indices]


def test_fps_sampling(video):
    frames, metadata = load_video(video, MediaOptions(fps=2.0, video_max_pixels=64 * 96))
    # 2 s at 2 fps = 4 frames, evenly spread over the 20 source frames (qwen-vl-utils' linspace).
    assert frames.dtype == torch.uint8 and frames.shape[:2] == (4, 3)
    assert metadata.frames_indices == [0, 6, 13, 19]
    assert metadata.total_num_frames == NUM_FRAMES and metadata.fps == FPS and metadata.duration == 2.0
    assert_timestamps_match_frames(frames, metadata)


def test_default_fps_is_two(video):
    frames, metadata = load_video(video, MediaOptions(video_max_pixels=64 * 96))
    assert len(frames) == 4 and metadata.frames_indices == [0, 6, 13, 19]


def test_fps_sampling_higher_rate(video):
    frames, metadata = load_video(video, MediaOptions(fps=5.0, video_max_pixels=64 * 96))
    assert len(frames) == 10
    assert metadata.frames_indices == torch.linspace(0, 19, 10).round().long().tolist()
    assert_timestamps_match_frames(frames, metadata)


def test_nframes_sampling(video):
    frames, metadata = load_video(video, MediaOptions(nframes=6, video_max_pixels=64 * 96))
    assert len(frames) == 6 and metadata.frames_indices == [0, 4, 8, 11, 15, 19]
    assert_timestamps_match_frames(frames, metadata)


@pytest.mark.parametrize("nframes, expected", [(5, 4), (7, 8), (100, 20)])
def test_frame_count_is_even(video, nframes, expected):
    frames, metadata = load_video(video, MediaOptions(nframes=nframes, video_max_pixels=64 * 96))
    assert len(frames) == expected == len(metadata.frames_indices)


def test_odd_source_frame_count(tmp_path):
    path = write_video(tmp_path / "odd.mp4", num_frames=7)
    frames, metadata = load_video(path, MediaOptions(fps=10.0, video_max_pixels=64 * 96))
    assert len(frames) == 6 and metadata.total_num_frames == 7


def test_fps_and_nframes_together_is_an_error(video):
    with pytest.raises(MediaError, match="clip.mp4"):
        load_video(video, MediaOptions(fps=2.0, nframes=4))


@pytest.mark.parametrize("factor", [28, 32])
def test_video_pixel_bounds(video, factor):
    frames, metadata = load_video(video, MediaOptions(image_factor=factor, video_max_pixels=40 * 60))
    h, w = frames.shape[2:]
    assert h % factor == 0 and w % factor == 0 and h * w <= 40 * 60
    assert (metadata.height, metadata.width) == (h, w)
    frames, _ = load_video(video, MediaOptions(image_factor=factor, video_min_pixels=200 * 300))
    h, w = frames.shape[2:]
    assert h % factor == 0 and w % factor == 0 and h * w >= 200 * 300
    assert source_index(frames[-1]) == NUM_FRAMES - 1  # resizing keeps the colours


def test_video_default_bounds(video):
    frames, _ = load_video(video, MediaOptions())
    h, w = frames.shape[2:]
    assert h * w >= 128 * 28 * 28 and h % 28 == 0 and w % 28 == 0  # qwen-vl-utils' video minimum


def test_video_resized_width_height(video):
    frames, _ = load_video(video, MediaOptions(video_resized_width=100, video_resized_height=50))
    assert frames.shape[2:] == (56, 112)


def test_container_without_frame_count(tmp_path):
    path = write_video(tmp_path / "clip.mkv")
    with av.open(path) as container:
        assert container.streams.video[0].frames == 0  # the case that falls back to counting packets
    frames, metadata = load_video(path, MediaOptions(fps=2.0, video_max_pixels=64 * 96))
    assert metadata.total_num_frames == NUM_FRAMES and metadata.frames_indices == [0, 6, 13, 19]
    assert_timestamps_match_frames(frames, metadata)


def test_frame_folder_video(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(11):  # frame_2 must sort before frame_10
        Image.new("RGB", (96, 64), colour(i)).save(folder / f"frame_{i}.png")
    frames, metadata = load_video(str(folder), MediaOptions(video_max_pixels=64 * 96))
    assert len(frames) == 12 and metadata.frames_indices == list(range(11)) + [10]
    assert [source_index(f) for f in frames] == metadata.frames_indices
    assert metadata.fps == 2.0 and metadata.total_num_frames == 11

    frames, metadata = load_video(str(folder), MediaOptions(fps=4.0, video_max_pixels=64 * 96))
    assert metadata.fps == 4.0 and len(frames) == 12

    frames, metadata = load_video(str(folder), MediaOptions(nframes=4, video_max_pixels=64 * 96))
    assert metadata.frames_indices == [0, 3, 7, 10] and metadata.fps == 2.0
    assert [source_index(f) for f in frames] == [0, 3, 7, 10]

    paths = [str(folder / f"frame_{i}.png") for i in (5, 1)]
    frames, metadata = load_video(paths, MediaOptions(video_max_pixels=64 * 96))
    assert [source_index(f) for f in frames] == [5, 1] and metadata.frames_indices == [0, 1]


def test_missing_video_names_the_path(tmp_path):
    with pytest.raises(MediaError, match="nope.mp4"):
        load_video(str(tmp_path / "nope.mp4"), MediaOptions())


def test_corrupt_video(tmp_path):
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(MediaError, match="corrupt.mp4"):
        load_video(str(path), MediaOptions())


def test_zero_and_one_frame_videos(tmp_path):
    import av

    empty = tmp_path / "empty.mp4"  # a container with a video stream and no frame (PyAV writes no file unless
    with av.open(str(empty), "w") as container:  # encoding starts)
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    assert empty.is_file()
    with pytest.raises(MediaError, match="empty.mp4") as error:
        load_video(str(empty), MediaOptions())
    assert "not found" not in str(error.value)
    with pytest.raises(MediaError, match="one.mp4"):
        load_video(write_video(tmp_path / "one.mp4", num_frames=1), MediaOptions())


def test_unknown_backend(video, monkeypatch):
    monkeypatch.setenv("VLTRAIN_VIDEO_BACKEND", "torchvision")
    with pytest.raises(ValueError, match="VLTRAIN_VIDEO_BACKEND"):
        load_video(video, MediaOptions())


@pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord is not installed")
@pytest.mark.parametrize("opts", [MediaOptions(fps=3.0), MediaOptions(nframes=8, video_max_pixels=40 * 60)])
def test_decord_matches_pyav(video, monkeypatch, opts):
    pytest.importorskip("decord")
    monkeypatch.setenv("VLTRAIN_VIDEO_BACKEND", "pyav")
    frames_av, meta_av = load_video(video, opts)
    monkeypatch.setenv("VLTRAIN_VIDEO_BACKEND", "decord")
    frames_dec, meta_dec = load_video(video, opts)
    assert meta_dec.video_backend == "decord"
    assert frames_dec.shape == frames_av.shape
    assert meta_dec.frames_indices == meta_av.frames_indices
    assert (meta_dec.total_num_frames, meta_dec.fps) == (meta_av.total_num_frames, meta_av.fps)
    # Both wrap ffmpeg but may convert yuv->rgb with different rounding.
    assert (frames_dec.int() - frames_av.int()).abs().max() <= 3


def test_qwen3_vl_video_processor_accepts_frames_and_metadata(video):
    from transformers import Qwen3VLVideoProcessor

    frames, metadata = load_video(video, MediaOptions(image_factor=32, fps=2.0))
    out = Qwen3VLVideoProcessor()(
        videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_metadata=True, return_tensors="pt"
    )
    t, h, w = out["video_grid_thw"][0].tolist()
    assert (t, h * 16, w * 16) == (len(frames) // 2, *frames.shape[2:])
    assert out["video_metadata"][0].frames_indices == [0, 6, 13, 19]
    # Qwen3VLProcessor writes one timestamp per temporal patch: the mean of its two frames' source times.
    shown = [source_index(f) / FPS for f in frames]
    assert [(a + b) / 2 for a, b in zip(shown[::2], shown[1::2])] == pytest.approx([0.3, 1.6])
