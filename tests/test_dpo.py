"""The DPO loop end to end on tiny models: one vision pass per pair, per-pair log-probs independent of the
batching, the references, precomputed reference log-probs and their cache, resume, SIGTERM, two processes."""

import copy
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin
from torch.utils.data import DataLoader

from loops.dpo import dpo_loss, pair_logps, train
from vltrain.attention import enable_packed_attention
from vltrain.build import build_model, build_reference
from vltrain.config import DPOConfig, DPOSection, load_config
from vltrain.data.media import MediaOptions
from vltrain.data.pairs import PairCollator, PairDataset, expand_media
from vltrain.families import family_spec
from vltrain.preference import LossType
from vltrain.tiny import build_tiny

from sigterm import sigterm_at
from conftest import REPO


def pair_records() -> list[dict]:
    """Text-only, one image, two images and a video pair in the upstream DPO format, prompts of different lengths."""
    return [
        {"id": "text", "prompt": "Say hello to the people in the room, politely.", "chosen": "hello there",
         "rejected": "go away"},
        {"id": "img", "image": "a.png", "prompt": "<image>\nWhat colour?", "chosen": "red", "rejected": "a blue one"},
        {"id": "multi", "image": ["a.png", "b.png"], "prompt": "<image>\n<image>\nWhich picture is wider, and why?",
         "chosen": "the second one", "rejected": "neither"},
        {"id": "vid", "video": "clip.mp4", "prompt": "<video>\nWhat happens?", "chosen": "It gets brighter.",
         "rejected": "Nothing at all happens in it."},
    ]


@pytest.fixture
def pair_data(media_dir):
    path = media_dir / "pairs.json"
    path.write_text(json.dumps(pair_records()))
    return path


def dpo_config(tmp_path, train_path, model_type="qwen2_5_vl", **overrides) -> DPOConfig:
    base = {
        "model.name_or_path": f"tiny:{model_type}", "model.dtype": "float32", "model.attn_implementation": "sdpa",
        "data.train_path": str(train_path), "data.image_folder": str(train_path.parent), "data.num_workers": 0,
        "data.max_seq_length": 1024, "data.nframes": 4, "data.image_max_pixels": 64 * 64 * 2,
        "data.video_max_pixels": 64 * 64, "optim.lr": 3e-3, "optim.warmup_steps": 0, "optim.scheduler": "constant",
        "train.output_dir": str(tmp_path / "out"), "train.report_to": "none", "train.max_steps": 4,
        "train.micro_batch_size": 2, "train.log_every": 1,
    }
    base.update(overrides)
    return load_config(DPOConfig, None, [f"{k}={v}" for k, v in base.items()])


def _dataset(model_type, processor, pair_data):
    media = MediaOptions(image_factor=family_spec(model_type).image_factor, image_max_pixels=64 * 64 * 2,
                         video_max_pixels=64 * 64, nframes=4)
    return PairDataset(pair_data, processor, media, max_seq_length=1024, image_folder=str(pair_data.parent))


def _collate(model, processor, packing):
    return PairCollator(model.config, packing=packing, pad_token_id=processor.tokenizer.pad_token_id)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_pair_logps_are_the_same_for_batch_1_and_4_padded_and_packed(model_type, pair_data):
    model, processor = build_tiny(model_type)
    packed = copy.deepcopy(model)
    enable_packed_attention(packed)  # as build_model does with data.packing: attention within each sequence
    ds = _dataset(model_type, processor, pair_data)
    examples = [ds[i] for i in range(len(ds))]
    assert len({len(e["chosen"]["input_ids"]) - len(e["chosen"]["labels"][e["chosen"]["labels"] != -100])
                for e in examples}) == 4  # four different prompt lengths
    with torch.no_grad():
        singles = [pair_logps(model, _collate(model, processor, False)([e])) for e in examples]
        expected = torch.stack([torch.cat([s.chosen, s.rejected]) for s in singles])
        for packing in (False, True):
            both = pair_logps(packed if packing else model, _collate(model, processor, packing)(examples))
            torch.testing.assert_close(torch.stack([both.chosen, both.rejected], 1), expected, atol=2e-5, rtol=1e-5)
            assert both.chosen_tokens.tolist() == [int(s.chosen_tokens) for s in singles]
    assert (expected < 0).all()


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_vision_tower_runs_once_per_pair_and_matches_the_duplicated_images_path(model_type, pair_data):
    """Frozen tower: one call for policy + reference together, on the unique media only; trainable tower: one
    call each. Either way the loss equals the peers' path (every image twice, no sharing)."""
    model, processor = build_tiny(model_type)
    enable_packed_attention(model)
    ds = _dataset(model_type, processor, pair_data)
    batch = _collate(model, processor, True)([ds[1], ds[2], ds[3]])  # image, two images, video
    unique_patches = int(batch["pixel_values"].shape[0] + batch["pixel_values_videos"].shape[0])
    naive = {k: v for k, v in batch.items() if k not in ("image_source", "video_source")} | expand_media(batch)
    assert naive["pixel_values"].shape[0] == 2 * batch["pixel_values"].shape[0]
    cfg = DPOSection()
    calls = []
    hook = model.model.visual.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(int(kwargs["grid_thw"].prod(-1).sum())), with_kwargs=True)
    for frozen in (True, False):
        model.model.visual.requires_grad_(not frozen)
        reference = build_reference(model)
        reference.prepare(Accelerator(cpu=True))
        calls.clear()
        loss, stats = dpo_loss(model, batch, cfg, reference, num_pairs=3)
        assert sum(calls) == (1 if frozen else 2) * unique_patches, calls
        assert len(calls) == (2 if frozen else 4)  # one image call and one video call per tower run
        with torch.no_grad():
            with reference() as ref_model:
                ref = pair_logps(ref_model, naive)
            policy = pair_logps(model, naive)
        margins = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)
        torch.testing.assert_close(loss, (-torch.nn.functional.logsigmoid(0.1 * margins)).mean(), atol=1e-6, rtol=1e-6)
        loss.backward()
        assert all(p.grad is not None for p in model.model.language_model.parameters())
        model.zero_grad()
    hook.remove()
    assert stats["rewards/chosen"].shape == (3,) and not stats["rewards/chosen"].requires_grad


def test_every_loss_type_gives_a_finite_loss_and_gradient(pair_data):
    model, processor = build_tiny("qwen2_vl")
    ds = _dataset("qwen2_vl", processor, pair_data)
    batch = _collate(model, processor, False)([ds[0], ds[1]])
    reference = build_reference(model).prepare(Accelerator(cpu=True))
    for loss_type in LossType:
        loss, stats = dpo_loss(model, batch, DPOSection(loss_type=[loss_type.value]), reference, num_pairs=2)
        loss.backward()
        grad = sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)
        assert math.isfinite(float(loss)) and grad > 0, loss_type
        assert set(stats) >= {"loss", f"loss/{loss_type.value}", "rewards/margin", "rewards/accuracy"}
        model.zero_grad()


def test_research_code_trains_with_objects_it_builds_itself(tmp_path, pair_data):
    """`from loops.dpo import train, dpo_loss` with a hand-built accelerator, model, reference and loader."""
    model, processor = build_tiny("qwen3_vl")
    cfg = dpo_config(tmp_path, pair_data, "qwen3_vl", **{"train.max_steps": 8, "optim.lr": 1e-2, "dpo.beta": 0.5})
    ds = _dataset("qwen3_vl", processor, pair_data)
    loader = DataLoader(ds, batch_size=2, shuffle=False, collate_fn=_collate(model, processor, False))
    accelerator = Accelerator(gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1,
                                                                                      sync_with_dataloader=False))
    reference = build_reference(model)
    result = train(accelerator, model, loader, cfg.train, cfg.optim, cfg.dpo, reference, eval_loader=loader)
    assert result.step == 8 and result.losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert result.losses[-1] < 0.5 * result.losses[0]
    before, after = result.eval_metrics[0][1], result.eval_metrics[-1][1]
    assert before["rewards/accuracy"] == 0.0 and after["rewards/accuracy"] == 1.0
    assert after["rewards/margin"] > 0 and result.metrics[-1]["rewards/chosen"] > result.metrics[-1]["rewards/rejected"]
    accelerator.end_training()


def test_lora_reference_equals_a_separately_loaded_frozen_copy(tmp_path, pair_data):
    cfg = dpo_config(tmp_path, pair_data, "qwen2_5_vl", **{
        "lora.enabled": "true", "lora.rank": 8, "lora.alpha": 16, "lora.dropout": 0.0, "trainable.freeze_llm": "true",
        "trainable.freeze_vision_tower": "true", "optim.lr": 1e-2, "train.max_steps": 3})
    built = build_model(cfg.model, cfg.trainable, cfg.lora, lora_reference=True)
    reference = build_reference(built.model, cfg.model)
    assert reference.adapters_off
    ds = _dataset("qwen2_5_vl", built.processor, pair_data)
    loader = DataLoader(ds, batch_size=2, collate_fn=_collate(built.model, built.processor, False))
    accelerator = Accelerator()
    result = train(accelerator, built.model, loader, cfg.train, cfg.optim, cfg.dpo, reference)
    batch = _collate(built.model, built.processor, False)([ds[i] for i in range(4)])
    fresh, _ = build_tiny("qwen2_5_vl")  # the same weights the policy was built from, loaded again
    with torch.no_grad():
        with result.reference() as ref_model:
            ref = pair_logps(ref_model, batch)
        base = pair_logps(fresh, batch)
        policy = pair_logps(result.model, batch)
    torch.testing.assert_close(ref.chosen, base.chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.rejected, base.rejected, atol=1e-5, rtol=1e-5)
    assert (policy.chosen - base.chosen).abs().max() > 1e-3  # the adapters trained: the policy moved


def test_precomputed_reference_log_probs_equal_on_the_fly_and_the_cache_is_reused(tmp_path, pair_data, capsys):
    from recipes.dpo import main

    on_the_fly = main(dpo_config(tmp_path / "a", pair_data, **{"data.eval_path": str(pair_data)}))
    capsys.readouterr()
    overrides = {"data.eval_path": str(pair_data), "dpo.precompute_ref_log_probs": "true",
                 "dpo.ref_cache_dir": str(tmp_path / "cache")}
    first = main(dpo_config(tmp_path / "b", pair_data, **overrides))
    assert "pairs computed, cached in" in capsys.readouterr().out
    [train_cache] = list((tmp_path / "cache").glob("train-*.json"))
    table = json.loads(train_cache.read_text())["logps"]
    assert sorted(table) == sorted(r["id"] for r in pair_records())
    model, processor = build_tiny("qwen2_5_vl")  # the untrained policy = the reference
    ds = _dataset("qwen2_5_vl", processor, pair_data)
    with torch.no_grad():
        logps = pair_logps(model, _collate(model, processor, False)([ds[i] for i in range(4)]))
    for i, record in enumerate(pair_records()):
        assert table[record["id"]] == pytest.approx([float(logps.chosen[i]), float(logps.rejected[i])], abs=1e-5)
    assert first["losses"] == pytest.approx(on_the_fly["losses"], abs=1e-5)
    assert first["eval"][-1]["loss"] == pytest.approx(on_the_fly["eval"][-1]["loss"], abs=1e-5)

    second = main(dpo_config(tmp_path / "c", pair_data, **overrides))
    out = capsys.readouterr().out
    assert "4 pairs reused from" in out and "pairs computed" not in out
    assert second["losses"] == pytest.approx(first["losses"], abs=1e-6)
    changed = main(dpo_config(tmp_path / "d", pair_data, **overrides, **{"data.image_max_pixels": 32 * 32 * 2}))
    assert "pairs computed" in capsys.readouterr().out and changed["steps"] == 4  # media options are in the key
    assert len(list((tmp_path / "cache").glob("train-*.json"))) == 2


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_load_no_reference(tmp_path, pair_data, monkeypatch, loss_type):
    import recipes.dpo

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss built a reference")

    monkeypatch.setattr(recipes.dpo, "build_reference", no_reference)
    summary = recipes.dpo.main(dpo_config(tmp_path, pair_data, **{
        "dpo.loss_type": f"[{loss_type}]", "dpo.beta": 2.0, "train.max_steps": 6, "optim.lr": 1e-2}))
    assert summary["steps"] == 6 and summary["final_loss"] < summary["losses"][0]
    assert summary["last_step_metrics"]["rewards/margin"] > 0


def test_config_rejects_options_no_loss_reads(tmp_path, pair_data):
    with pytest.raises(ValueError, match="dpo.label_smoothing"):
        dpo_config(tmp_path, pair_data, **{"dpo.loss_type": "[hinge]", "dpo.label_smoothing": 0.1})
    with pytest.raises(ValueError, match="dpo.simpo_gamma"):
        dpo_config(tmp_path, pair_data, **{"dpo.simpo_gamma": 1.0})
    with pytest.raises(ValueError, match="dpo.ref_cache_dir"):
        dpo_config(tmp_path, pair_data, **{"dpo.ref_cache_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="dpo.loss_type"):
        dpo_config(tmp_path, pair_data, **{"dpo.loss_type": "[kto]"})


def test_resume_from_a_checkpoint_gives_the_straight_run(tmp_path, pair_data):
    from recipes.dpo import main

    straight = main(dpo_config(tmp_path / "straight", pair_data, **{"train.max_steps": 6, "train.micro_batch_size": 1}))
    main(dpo_config(tmp_path / "cut", pair_data, **{"train.max_steps": 3, "train.micro_batch_size": 1,
                                                    "train.save_every": 3}))
    cfg = dpo_config(tmp_path / "cut", pair_data, **{"train.max_steps": 6, "train.micro_batch_size": 1,
                                                     "train.resume": "auto"})
    resumed = main(cfg)
    assert resumed["steps"] == 6
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5, abs=1e-6)


def test_sigterm_checkpoints_exits_0_and_resumes(tmp_path, pair_data):
    from recipes.dpo import main

    overrides = {"train.max_steps": 40, "train.micro_batch_size": 1, "data.num_workers": 1}
    cfg = dpo_config(tmp_path / "run", pair_data, **overrides)
    args = [f"{k}={v}" for k, v in {
        "model.name_or_path": cfg.model.name_or_path, "model.dtype": "float32", "model.attn_implementation": "sdpa",
        "data.train_path": str(pair_data), "data.image_folder": str(pair_data.parent), "data.num_workers": 1,
        "data.nframes": 4, "data.image_max_pixels": 64 * 64 * 2, "data.video_max_pixels": 64 * 64,
        "optim.lr": 3e-3, "optim.warmup_steps": 0, "optim.scheduler": "constant", "train.report_to": "none",
        "train.output_dir": str(tmp_path / "run" / "out"), "train.max_steps": 40, "train.micro_batch_size": 1,
        "train.log_every": 1}.items()]
    returncode, output = sigterm_at(REPO / "recipes" / "dpo.py", args, "step  3/40")
    assert returncode == 0, output[-3000:]
    summary = json.loads((tmp_path / "run" / "out" / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["preempted"] == "SIGTERM" and 3 <= stopped < 40 and summary["export_dir"] is None
    assert "Traceback" not in output
    assert (tmp_path / "run" / "out" / "checkpoints" / f"step_{stopped:06d}" / "COMPLETE").is_file()
    resumed = main(dpo_config(tmp_path / "run", pair_data, **overrides, **{"train.resume": "auto"}))
    assert resumed["steps"] == 40 and resumed["losses"][:stopped] == summary["losses"]
    straight = main(dpo_config(tmp_path / "straight", pair_data, **overrides))
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5, abs=1e-6)


def test_two_process_cpu_run(tmp_path, pair_data):
    """accelerate launch --multi_gpu --num_processes 2 on CPU (gloo): the recipe trains, evaluates and exports."""
    cfg = dpo_config(tmp_path, pair_data, **{"data.eval_path": str(pair_data), "train.max_steps": 3,
                                             "train.micro_batch_size": 1})
    args = [f"model.name_or_path={cfg.model.name_or_path}", "model.dtype=float32", "model.attn_implementation=sdpa",
            f"data.train_path={pair_data}", f"data.eval_path={pair_data}", f"data.image_folder={pair_data.parent}",
            "data.num_workers=0", "data.nframes=4", f"data.image_max_pixels={64 * 64 * 2}",
            f"data.video_max_pixels={64 * 64}", "data.packing=true", "train.report_to=none", "train.max_steps=3",
            "train.micro_batch_size=1", f"train.output_dir={tmp_path / 'out'}", "optim.warmup_steps=0"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29537",
           str(REPO / "recipes" / "dpo.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert "2 process(es) = 2 samples/step" in proc.stdout
    assert summary["eval"][0]["step"] == 0 and summary["eval"][-1]["step"] == 3
    # the step's pair means are over the pairs of both ranks, counted once (were halved: the count summed twice)
    assert summary["last_step_metrics"]["loss/sigmoid"] == pytest.approx(summary["losses"][-1], rel=1e-4)
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_demo_learns_the_chosen_behaviour(tmp_path):
    """`accelerate launch recipes/dpo.py`: SFT teaches bare answers, DPO a full sentence; the issue's targets."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/dpo.py", "dpo_demo",
           f"train.output_dir={tmp_path / 'dpo'}", f"model.name_or_path={tmp_path / 'sft' / 'final'}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"demo wall time (SFT stage included): {time.monotonic() - start:.0f} s")
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file()  # the SFT stage ran inside the demo
    before, after = summary["eval"][0], summary["eval"][-1]
    assert before["step"] == 0 and before["rewards/accuracy"] <= 0.1
    assert after["rewards/accuracy"] >= 0.90, after
    assert summary["generations_before"]["chosen"] <= 0.05 and summary["generations_before"]["rejected"] >= 0.8
    assert summary["generations_after"]["chosen"] >= 0.80, summary["generations_after"]
    assert "greedy answers after DPO" in proc.stdout and f"model: {tmp_path / 'dpo' / 'final'}" in proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_gpu_shared_vision_with_kernels_matches_the_duplicated_images_path(model_type, pair_data):
    """bf16 on CUDA with packing and every kernel: the one-pass batch gives the log-probs of the peers' path."""
    from vltrain.config import LoraConfig, ModelConfig, TrainableConfig

    built = build_model(ModelConfig(name_or_path=f"tiny:{model_type}", dtype="bfloat16", attn_implementation="sdpa",
                                    kernels=["all"]), TrainableConfig(freeze_vision_tower=True), LoraConfig(), packing=True)
    model = built.model.cuda()
    ds = _dataset(model_type, built.processor, pair_data)
    batch = _collate(model, built.processor, True)([ds[i] for i in range(4)])
    naive = {k: v for k, v in batch.items() if k not in ("image_source", "video_source")} | expand_media(batch)
    on_gpu = lambda b: {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    reference = build_reference(model).prepare(Accelerator())
    loss, stats = dpo_loss(model, on_gpu(batch), DPOSection(), reference, num_pairs=4)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(math.log(2), abs=1e-3)
    with torch.no_grad():
        shared, plain = pair_logps(model, on_gpu(batch)), pair_logps(model, on_gpu(naive))
    torch.testing.assert_close(shared.chosen, plain.chosen, atol=0.05, rtol=0.01)
    torch.testing.assert_close(shared.rejected, plain.rejected, atol=0.05, rtol=0.01)


@pytest.mark.slow
def test_zero3_dpo_matches_ddp_with_a_sharded_reference(tmp_path, pair_data):
    """2 CPU processes: ZeRO-3 (policy and frozen reference partitioned) trains like DDP, pair for pair."""
    pytest.importorskip("deepspeed")
    import socket

    model, processor = build_tiny("qwen2_5_vl")  # one saved model: ZeRO-3 and DDP start from the same weights
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    runs = {}
    for backend in ("ddp", "zero3"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp_path / backend
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(REPO / "tests" / "dist_recipe.py"), "dpo", backend, str(pair_data), str(out),
               f"model.name_or_path={tmp_path / 'tiny'}", "train.max_steps=3", "train.micro_batch_size=1",
               "data.packing=true", "optim.lr=1e-2", "optim.max_grad_norm=0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        runs[backend] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert runs["zero3"][0]["reference"] == "DeepSpeedEngine" and runs["ddp"][0]["reference"] != "DeepSpeedEngine"
    assert runs["zero3"][0]["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert runs["zero3"][0]["losses"] == pytest.approx(runs["ddp"][0]["losses"], rel=1e-4, abs=1e-5)
    assert runs["zero3"][0]["losses"][-1] < runs["zero3"][0]["losses"][0]
