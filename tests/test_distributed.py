"""2-process CPU runs of the SFT recipe under DDP (gloo) and DeepSpeed ZeRO-2 / ZeRO-3.

Each case launches `torchrun --nproc_per_node 2 tests/dist_backends.py BACKEND ...` (see that file for
what each rank records) with a subprocess timeout, so a hang fails instead of blocking CI. fp32
throughout, Qwen2.5-VL tiny model, micro-batch 1 x accumulation 2 x 2 ranks, unshuffled data.

Not testable on CPU (needs GPUs): FSDP2 -- accelerate 1.15 enables FSDP only for GPU-like distributed
types (its state.py never pairs FSDP with MULTI_CPU): on CPU an fsdp2 launch silently runs as DDP.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO, mixed_records, write_image, write_video

pytest.importorskip("deepspeed")
LR, VISION_LR, MERGER_LR = 3e-3, 1e-5, 1e-4  # the helper's optimizer settings
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(backend: str, data, out, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "dist_backends.py"), backend, str(data), str(out),
           f"model.name_or_path={data.parent / 'tiny'}", *overrides]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{backend} run hung (> {timeout} s): {(e.stdout or b'')[-2000:]!r} {(e.stderr or b'')[-2000:]!r}")


def run_ok(backend, data, out, *overrides) -> list[dict]:
    proc = launch(backend, data, out, *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """mixed.json: text-only at even positions, image/video at odd ones (so rank 0 only ever sees text-only
    batches and rank 1 only media); media.json: image and video samples only."""
    root = tmp_path_factory.mktemp("dist_data")
    write_image(root / "a.png", (64, 64), seed=1)
    write_image(root / "b.png", (96, 64), seed=2)
    write_video(root / "clip.mp4")
    text, img, multi, vid = mixed_records()
    mixed, media = [], []
    for i, m in enumerate([img, vid, multi, vid]):
        mixed += [dict(text, id=f"text{i}"), dict(m, id=f"{m['id']}{i}")]
        media += [dict(m, id=f"{m['id']}{i}a"), dict(m, id=f"{m['id']}{i}b")]
    (root / "mixed.json").write_text(json.dumps(mixed))
    (root / "media.json").write_text(json.dumps(media))
    # One saved tiny model for every run: under ZeRO-3 transformers builds the model inside zero.Init
    # (accelerate's DeepSpeed plugin turns it on whatever zero3_init says), and a model built from config
    # there gets other random weights than DDP's; loaded from a folder, both start from the same weights.
    from vltrain.tiny import build_tiny

    torch.manual_seed(0)
    model, processor = build_tiny("qwen2_5_vl")
    model.save_pretrained(root / "tiny")
    processor.save_pretrained(root / "tiny")
    return root


@pytest.fixture(scope="module")
def ddp_mixed(datasets):
    return run_ok("ddp", datasets / "mixed.json", datasets / "ddp_mixed")


@pytest.fixture(scope="module")
def zero2_mixed(datasets):
    return run_ok("zero2", datasets / "mixed.json", datasets / "zero2_mixed", "train.save_every=2")


@pytest.fixture(scope="module")
def ddp_media(datasets):
    return run_ok("ddp", datasets / "media.json", datasets / "ddp_media")


@pytest.fixture(scope="module")
def zero3_media(datasets):
    return run_ok("zero3", datasets / "media.json", datasets / "zero3_media", "train.save_every=2")


def _check_lr_groups(rank: dict) -> None:
    """The prepared optimizer holds our groups, and each moved its weights by about its own lr per step."""
    assert rank["group_lrs"] == {"llm": LR, "llm_no_decay": LR, "vision": VISION_LR, "vision_no_decay": VISION_LR,
                                 "merger": MERGER_LR, "merger_no_decay": MERGER_LR}
    change = rank["max_change"]  # Adam moves a weight by ~lr per step (exactly lr on step 1)
    for name, lr in (("llm", LR), ("vision", VISION_LR), ("merger", MERGER_LR)):
        assert lr <= change[name] <= 1.5 * STEPS * lr, (name, change)


def _close(a, b, rel=1e-4):
    return all(abs(x - y) <= rel * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True))


def test_ddp_mixed_modality_text_rank_and_media_rank_stay_in_sync(ddp_mixed):
    r0, r1 = ddp_mixed
    assert r0["distributed_type"] == "DistributedType.MULTI_CPU" and r0["world_size"] == 2
    assert r0["has_media"] == [False] * (2 * STEPS) and r1["has_media"] == [True] * (2 * STEPS)
    assert r0["checksum"] == r1["checksum"]
    assert r0["losses"] == r1["losses"] and r0["losses"][-1] < r0["losses"][0]
    _check_lr_groups(r0)
    assert r1["group_lrs"] == r0["group_lrs"]


def _check_deepspeed_run(runs, baseline, out, stage):
    r0, r1 = runs
    assert r0["distributed_type"] == "DistributedType.DEEPSPEED" and r0["world_size"] == 2
    assert r0["optimizer_type"] == ("DeepSpeedZeroOptimizer" if stage == 2 else "DeepSpeedZeroOptimizer_Stage3")
    assert r0["losses"] == r1["losses"]
    base = baseline[0]
    assert abs(r0["losses"][0] - base["losses"][0]) <= 1e-6 * base["losses"][0]
    # same gradient as DDP step after step: the ga * world loss scaling and the clipping setting hold
    assert _close(r0["losses"], base["losses"]) and _close(r0["grad_norms"], base["grad_norms"])
    _check_lr_groups(r0)
    assert r1["group_lrs"] == r0["group_lrs"]
    assert r0["fixed_loss"] == pytest.approx(base["fixed_loss"], rel=1e-4)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000004"]


def _export_loss(export_dir, batch_file) -> float:
    """Loss of the exported model in plain transformers, one process."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(export_dir, dtype=torch.float32).eval()
    batch = torch.load(batch_file, weights_only=True)
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "labels", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    with torch.no_grad():
        return float(model(**{k: batch[k] for k in keys if batch.get(k) is not None}).loss)


def _check_resume(backend, data, out, straight):
    resumed = run_ok(backend, data, out.parent / f"{out.name}_resumed",
                     f"train.resume={out / 'checkpoints' / 'step_000002'}")
    assert _close(resumed[0]["losses"], straight[0]["losses"][2:], rel=1e-5)


@pytest.mark.slow
def test_zero2_mixed_modality_matches_ddp_saves_resumes_and_exports(datasets, zero2_mixed, ddp_mixed):
    out = datasets / "zero2_mixed"
    _check_deepspeed_run(zero2_mixed, ddp_mixed, out, stage=2)
    assert zero2_mixed[0]["has_media"] == [False] * (2 * STEPS) and zero2_mixed[1]["has_media"] == [True] * (2 * STEPS)
    assert _export_loss(out / "final", out / "fixed_batch.pt") == pytest.approx(zero2_mixed[0]["fixed_loss"], rel=1e-5)
    _check_resume("zero2", datasets / "mixed.json", out, zero2_mixed)


@pytest.mark.slow
def test_zero3_matches_ddp_saves_resumes_and_exports(datasets, zero3_media, ddp_media):
    out = datasets / "zero3_media"
    _check_deepspeed_run(zero3_media, ddp_media, out, stage=3)
    assert _export_loss(out / "final", out / "fixed_batch.pt") == pytest.approx(zero3_media[0]["fixed_loss"], rel=1e-5)
    _check_resume("zero3", datasets / "media.json", out, zero3_media)


@pytest.mark.slow
def test_zero3_mixed_modality_text_rank_and_media_rank(datasets, ddp_mixed):
    """ZeRO-3 checks on the first step that every rank ran the same module sequence: the text-only rank
    gets dummy media appended (vltrain.vision.complete_modalities), so it runs the same image and video
    paths as the media rank, and the losses match DDP's."""
    r0, r1 = run_ok("zero3", datasets / "mixed.json", datasets / "zero3_mixed")
    assert r0["has_media"] == [False] * (2 * STEPS) and r1["has_media"] == [True] * (2 * STEPS)
    assert r0["losses"] == r1["losses"]
    assert _close(r0["losses"], ddp_mixed[0]["losses"]) and _close(r0["grad_norms"], ddp_mixed[0]["grad_norms"])


def test_zero3_exact_match_eval_generates_on_every_rank(datasets):
    """train.eval_exact_match under ZeRO-3: each rank answers its share of the held-out prompts (3 prompts: 2 on
    rank 0, 1 on rank 1, so the ranks generate different numbers of batches) with synced forwards; the records of
    both ranks are gathered into one file."""
    out = datasets / "zero3_exact_match"
    run_ok("zero3", datasets / "media.json", out, "train.max_steps=1", f"data.eval_path={datasets / 'media.json'}",
           "train.eval_exact_match=3")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "exact_match.jsonl").read_text().splitlines()]
    assert len(records) == 3 and 0.0 <= summary["exact_match"] <= 1.0
    assert summary["exact_match"] == sum(r["correct"] for r in records) / 3
    assert all(r["reply"] is not None and r["finish_reason"] in ("stop", "length") for r in records)
