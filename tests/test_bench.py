"""The benchmark script itself, on CPU with a tiny preset: both paths run and compute the same loss."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_bench_sft_paths_agree_on_a_tiny_preset(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/bench_sft.py", "--preset", "tiny_qwen2_5_vl",
           "--runs", "vltrain:full:gc0,hf:full:gc1,vltrain:full:gc1@512", "--steps", "1", "--warmup", "0", "--num_samples", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())
    vltrain, hf = (next(r for r in runs if r["path"] == p) for p in ("vltrain", "hf"))
    assert vltrain["ok"] and hf["ok"]
    assert vltrain["padded_tokens"] == vltrain["real_tokens"] < hf["padded_tokens"]  # packing: no padding
    assert vltrain["losses"][0] == pytest.approx(hf["losses"][0], rel=1e-4)
    small = runs[2]  # checkpointing, a smaller per-run token budget: more micro-batches, same loss
    assert small["ok"] and small["token_budget"] == 512 and small["micro_batches"] > vltrain["micro_batches"]
    assert small["losses"][0] == pytest.approx(vltrain["losses"][0], rel=1e-4)
    assert hf["loss_reference"] == vltrain["run"] and hf["loss_rel_diff"] < 1e-4  # the agreement check ran
    assert "WARNING" not in proc.stdout


def test_check_losses_flags_a_run_that_does_not_train_like_the_first_of_its_mode():
    """Round 8's compiled LoRA runs: the first loss agreed, the later ones fell ~2% below HF's. The check
    compares every step, per mode, and skips the loop path (other data) and failed runs."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_sft import check_losses

    def run(spec, losses, ok=True):
        path, mode, _ = spec.split(":")
        return {"run": spec, "path": path, "mode": mode, "ok": ok, "losses": losses}

    hf_lora, eager, compiled = (run("hf:lora:gc1@4", [12.679, 12.676, 12.665, 12.647]),
                                run("vltrain:lora:gc1@32768", [12.677, 12.673, 12.664, 12.646]),
                                run("vltrain:lora:gc1c@32768", [12.677, 12.519, 12.460, 12.401]))
    hf_full, full = run("hf:full:gc1@4", [12.445, 11.961, 11.537]), run("vltrain:full:gc1c", [12.445, 11.961, 11.535])
    loop, failed = run("loop:lora:gc1", [9.0, 8.0]), run("vltrain:lora:gc2", [], ok=False)
    warnings = check_losses([hf_lora, hf_full, eager, loop, failed, compiled, full])
    assert len(warnings) == 1 and warnings[0].startswith("WARNING vltrain:lora:gc1c@32768: ")
    assert "hf:lora:gc1@4" in warnings[0] and "by up to 1.95%" in warnings[0]  # 12.401 vs 12.647
    assert compiled["loss_rel_diff"] == pytest.approx(0.246 / 12.647, rel=1e-3)
    assert eager["loss_reference"] == "hf:lora:gc1@4" and eager["loss_rel_diff"] < 5e-4
    assert full["loss_reference"] == "hf:full:gc1@4" and full["loss_rel_diff"] < 2e-4
    assert "loss_reference" not in loop and "loss_reference" not in failed and "loss_reference" not in hf_lora


LOOP_FIELDS = ("ok", "step_s", "real_tokens", "padded_tokens", "micro_batches", "tokens_per_s", "tflops", "mfu",
               "peak_gib", "losses", "token_budget")


def test_bench_loop_path_is_loops_sft_train_on_its_written_data(tmp_path, one_thread):
    """`loop:full:gc0` on a tiny preset: the result has the other paths' fields, its step time is the loop's own
    logged tokens_per_s, and the same config, saved model and data run through loops.sft.train directly give the
    same step-1 loss (one thread each: on the shared 2-core box two threads run slower)."""
    import os

    from vltrain.build import build_model
    from vltrain.config import SFTConfig, load_config
    from vltrain.data.dataset import SFTDataset
    from vltrain.data.formats import read_records
    from vltrain.data.loader import build_loader
    from vltrain.data.media import MediaOptions
    from vltrain.distributed import build_accelerator
    from vltrain.plots import read_metrics
    from loops.sft import train

    work, out = tmp_path / "work", tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/bench_sft.py", "--preset", "tiny_qwen2_5_vl", "--runs", "loop:full:gc0",
           "--steps", "1", "--warmup", "0", "--num_samples", "4", "--num_workers", "0", "--workdir", str(work),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loop, = json.loads(out.read_text())
    assert loop["ok"], loop.get("detail")
    assert all(key in loop for key in LOOP_FIELDS), sorted(loop)
    assert loop["path"] == "loop" and loop["token_budget"] == 16384 and loop["tokens_per_s"] > 0
    assert loop["padded_tokens"] == loop["real_tokens"] and len(loop["losses"]) == 1

    run_dir = work / "loop_full_gc0"
    records = read_records(run_dir / "data" / "train.json")  # the data it wrote: images, a video, text only
    assert len(records) == 4 and "video" in records[3] and (run_dir / "data" / records[3]["video"]).stat().st_size
    assert sum("image" in r for r in records) == 3
    metrics = read_metrics(run_dir / "out" / "metrics.jsonl")  # written by loops.sft.train, one line per step
    assert [m["step"] for m in metrics] == [1]
    assert loop["step_s"] == pytest.approx(loop["real_tokens"] / metrics[0]["tokens_per_s"], rel=1e-9)

    cfg = load_config(SFTConfig, run_dir / "config.yaml", [f"train.output_dir={tmp_path / 'direct'}"])
    assert cfg.data.packing and cfg.data.max_tokens_per_batch == 16384 and cfg.model.kernels == ["all"]
    built = build_model(cfg.model, cfg.trainable, cfg.lora, packing=True)
    media = MediaOptions.from_config(cfg.data, image_factor=built.spec.image_factor)
    dataset = SFTDataset(cfg.data.train_path, built.processor, media, max_seq_length=cfg.data.max_seq_length,
                         image_folder=cfg.data.image_folder)
    assert sum(len(dataset[i]["input_ids"]) for i in range(len(dataset))) == loop["real_tokens"]
    loader = build_loader(dataset, cfg.data, built.processor, built.model.config, micro_batch_size=1, shuffle=False)
    assert len(loader) == loop["micro_batches"] == cfg.train.gradient_accumulation_steps
    result = train(build_accelerator(cfg.train), built.model, loader, cfg.train, cfg.optim)
    assert result.losses == pytest.approx(loop["losses"], rel=1e-5)


def test_bench_loop_epoch_steps_puts_several_steps_in_one_epoch(tmp_path, one_thread):
    """`--loop_epoch_steps 2`: the data written twice (new ids), so one epoch holds 2 optimizer steps of half the
    loader's micro-batches each; 3 steps run (the third in the second epoch) and each is timed from its own tokens."""
    import os

    from vltrain.data.formats import read_records

    work, out = tmp_path / "work", tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/bench_sft.py", "--preset", "tiny_qwen2_5_vl", "--runs", "loop:full:gc0@4096",
           "--steps", "2", "--warmup", "1", "--num_samples", "4", "--num_workers", "0", "--loop_epoch_steps", "2",
           "--workdir", str(work), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loop, = json.loads(out.read_text())
    assert loop["ok"] and loop["epoch_steps"] == 2 and len(loop["losses"]) == 3 and len(loop["step_times"]) == 2
    records = read_records(work / "loop_full_gc0@4096" / "data" / "train.json")
    assert len(records) == 8 and len({r["id"] for r in records}) == 8
    assert [r["conversations"] for r in records[:4]] == [r["conversations"] for r in records[4:]]


@pytest.mark.gpu
def test_bench_loop_path_on_a_gpu_uses_bf16_autocast_and_reports_memory_and_mfu(tmp_path):
    """On a GPU the loop path runs under single_gpu.yaml's bf16 mixed precision with bf16 weights, and reports peak
    memory and an MFU against the measured matmul ceiling, beside the vltrain path in the same process. (Skipped
    until 2026-12-02: the loop path stalled in PyAV's frame conversion in forked workers, fixed in
    vltrain/data/media.py; the 3B loop runs of benchmarks/RESULTS.md round 6 ran through it on the H200. This
    tiny-preset test itself has not run on a GPU since.)"""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/bench_sft.py", "--preset", "tiny_qwen2_5_vl",
           "--runs", "vltrain:full:gc1,loop:full:gc1", "--steps", "2", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vltrain, loop = json.loads(out.read_text())
    assert vltrain["ok"] and loop["ok"], loop.get("detail")
    assert loop["mixed_precision"] == "bf16" and loop["kernels"] == ["all"]
    assert loop["peak_gib"] > 0 and 0 < loop["mfu"] < 1 and loop["tokens_per_s"] > 0
    assert len(loop["step_times"]) == 2 and len(loop["losses"]) == 3


def test_kernel_summary_groups_gpu_kernels_by_category_and_measures_the_busy_union():
    """The profile summary counts device kernels only, by category, and the GPU's busy time as the union of the
    kernels' intervals (two overlapping kernels are busy once), over first-to-last-kernel wall time."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_sft import kernel_summary

    def event(name, start, end, device=DeviceType.CUDA):
        span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(name=name, device_type=device, time_range=span)

    events = [event("sm90_xmma_gemm_bf16", 0, 600), event("flash_fwd_kernel", 500, 700),
              event("vectorized_elementwise_kernel", 900, 1000), event("aten::mm", 0, 5000, DeviceType.CPU)]
    text = kernel_summary(SimpleNamespace(events=lambda: events))
    first, *rows = text.splitlines()
    # busy: [0, 700] and [900, 1000] = 800 us of 1000 us; the CPU op is not a kernel
    assert first.startswith("GPU busy 0.8 ms of 1.0 ms") and "(80.0%)" in first and "3 kernels" in first
    shares = {row.split("  ")[1].strip(): row.split()[-1] for row in rows}
    assert shares == {"gemm": "66.7%", "attention": "22.2%", "elementwise": "11.1%"}
