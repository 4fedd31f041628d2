"""The SFT loop end to end on tiny models: learning, accumulation maths, export, research-code use."""

import json
import math
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin
from torch.utils.data import DataLoader
from transformers import AutoModelForImageTextToText, AutoProcessor

from loops.sft import count_label_tokens, sft_loss, train
from recipes.sft import main
from vltrain.checkpoint import export_model
from vltrain.data.dataset import PadCollator, SFTDataset
from vltrain.data.media import MediaOptions
from vltrain.families import family_spec
from vltrain.progress import model_inputs
from vltrain.tiny import build_tiny

from conftest import FAMILIES, REPO, mixed_records, sft_config


@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_family_learns_on_a_mixed_dataset(model_type, mixed_data, tmp_path):
    """text-only + image + multi-image + video in one batch of 4; the loss falls and the export reloads."""
    cfg = sft_config(tmp_path, model_type, mixed_data, **{"train.micro_batch_size": 4, "train.max_steps": 12})
    summary = main(cfg)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["num_skipped"] == 0
    assert written["losses"] == summary["losses"] and len(summary["losses"]) == 12
    assert summary["losses"][0] > 5.0  # ~log(512) at random init
    assert summary["final_loss"] < 0.5 * summary["losses"][0]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "config.yaml").is_file() and written["export_dir"].endswith("final")


def test_export_reloads_in_plain_transformers_and_generates(tmp_path, media_dir, mixed_data):
    cfg = sft_config(tmp_path, "qwen2_5_vl", mixed_data, **{"train.max_steps": 2})
    main(cfg)
    final = tmp_path / "out" / "final"
    model = AutoModelForImageTextToText.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    assert model.config.model_type == "qwen2_5_vl"
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(media_dir / "a.png")], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # the exported weights are the trained ones
    trained, _ = build_tiny("qwen2_5_vl")
    assert not torch.equal(trained.lm_head.weight, model.lm_head.weight)


def _delta_after_one_step(tmp_path, data, micro, ga, name):
    """Parameter change after one optimizer step with an update that is linear in the gradient:
    AdamW with eps >> |grad| gives update = lr * grad / eps, so lr = eps makes the update the gradient."""
    cfg = sft_config(tmp_path / name, "qwen2_vl", data, **{
        "train.micro_batch_size": micro, "train.gradient_accumulation_steps": ga, "train.max_steps": 1,
        "optim.lr": 1e8, "optim.eps": 1e8, "optim.max_grad_norm": 0, "optim.betas": "[0.0,0.0]",
        "optim.weight_decay": 0.0,
    })
    main(cfg)
    before, _ = build_tiny("qwen2_vl")
    after = AutoModelForImageTextToText.from_pretrained(tmp_path / name / "out" / "final")
    return {n: (a - b) for (n, a), (_, b) in zip(after.state_dict().items(), before.state_dict().items())}


def test_accumulation_2x1_equals_1x2(tmp_path, media_dir):
    records = mixed_records()[1:3]  # different lengths: a per-sample mean would weigh them differently
    data = media_dir / "two.json"
    data.write_text(json.dumps(records))
    a = _delta_after_one_step(tmp_path, data, micro=1, ga=2, name="ga2")
    b = _delta_after_one_step(tmp_path, data, micro=2, ga=1, name="ga1")
    assert max(v.abs().max() for v in a.values()) > 1e-4  # something moved
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sft_loss_is_a_global_token_mean(media_dir, mixed_data):
    model, processor = build_tiny("qwen2_vl")
    media = MediaOptions(image_factor=28, image_max_pixels=64 * 64 * 2, video_max_pixels=64 * 64, nframes=4)
    ds = SFTDataset(mixed_data, processor, media, max_seq_length=1024, image_folder=str(media_dir))
    collate = PadCollator(processor.tokenizer.pad_token_id)
    one, two = collate([ds[0], ds[1]]), collate([ds[2]])
    n = count_label_tokens(one) + count_label_tokens(two)
    both = sft_loss(model, one, n) + sft_loss(model, two, n)
    # reference: per-token losses of every sample, averaged over all supervised tokens
    token_losses = []
    for i in range(3):
        b = collate([ds[i]])
        logits = model(**model_inputs(b, labels=False)).logits
        labels = b["labels"][:, 1:]
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="none")
        token_losses.append(lp[labels.flatten() != -100])
    torch.testing.assert_close(both, torch.cat(token_losses).mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_text_only_batch_runs_the_vision_tower(model_type, media_dir, mixed_data):
    model, processor = build_tiny(model_type)
    media = MediaOptions(image_factor=family_spec(model_type).image_factor)
    ds = SFTDataset(mixed_data, processor, media, max_seq_length=1024, image_folder=str(media_dir))
    batch = PadCollator(processor.tokenizer.pad_token_id)([ds[0]])  # the text-only sample
    assert "pixel_values" not in batch
    plain = model(**model_inputs(batch)).loss
    loss = sft_loss(model, batch, count_label_tokens(batch))
    torch.testing.assert_close(loss, plain)  # same value ...
    loss.backward()
    assert all(p.grad is not None for p in model.model.visual.parameters())  # ... every vision param in the graph


def test_train_with_objects_built_by_hand(tmp_path, media_dir, mixed_data):
    """Research-code use: build accelerator, model and loader yourself and call loops.sft.train."""
    model, processor = build_tiny("qwen3_vl")
    cfg = sft_config(tmp_path, "qwen3_vl", mixed_data, **{"train.max_steps": 6, "optim.lr": 5e-3})
    media = MediaOptions(image_factor=32, image_max_pixels=64 * 64 * 2, video_max_pixels=64 * 64, nframes=4)
    ds = SFTDataset(mixed_data, processor, media, max_seq_length=1024, image_folder=str(media_dir))
    loader = DataLoader(ds, batch_size=2, shuffle=False, collate_fn=PadCollator(processor.tokenizer.pad_token_id))
    accelerator = Accelerator(gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1,
                                                                                      sync_with_dataloader=False))
    result = train(accelerator, model, loader, cfg.train, cfg.optim, eval_loader=loader)
    assert len(result.losses) == 6 and result.step == 6
    assert result.losses[-1] < result.losses[0]
    assert result.eval_losses and result.eval_losses[-1][1] < math.log(512)
    export_dir = export_model(accelerator, result.model, processor, cfg, tmp_path / "final")  # the caller exports
    assert (export_dir / "config.json").is_file()
    accelerator.end_training()


def test_two_process_cpu_run_keeps_weights_in_sync(tmp_path, mixed_data):
    """accelerate launch --multi_gpu --num_processes 2 on CPU (gloo): each rank writes a checksum."""
    script = REPO / "tests" / "dist_train.py"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(script), str(mixed_data), str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sums = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert sums[0]["world_size"] == sums[1]["world_size"] == 2
    assert sums[0]["checksum"] == sums[1]["checksum"]
    assert sums[0]["losses"][-1] < sums[0]["losses"][0]


def test_tensorboard_logs_train_and_periodic_eval_loss(tmp_path, mixed_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = sft_config(tmp_path, "qwen2_vl", mixed_data, **{
        "train.report_to": "tensorboard", "train.max_steps": 4, "train.eval_every": 2,
        "data.eval_path": str(mixed_data)})
    summary = main(cfg)
    assert [s for s, _ in summary["eval_losses"]] == [2, 4]
    events = list((tmp_path / "out").rglob("events.out.tfevents.*"))
    assert events, "tensorboard writes into the output folder by default"
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.step for e in acc.Scalars(tag)]
    assert scalars["loss"] == [1, 2, 3, 4]
    assert scalars["eval_loss"] == [2, 4]
    assert {"lr", "grad_norm", "tokens_per_s", "memory_gib"} <= set(scalars)
