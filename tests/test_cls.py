"""Classification (#13): the head's pooling, LoRA and learning rates, early stopping, export / reload / predict,
resume, a 2-process run, research-code use and the demo."""

import copy
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from loops.cls import train
from vltrain.attention import enable_packed_attention
from vltrain.classifier import HeadSpec, VLClassifier, last_token_positions, load_classifier
from vltrain.config import CLSConfig, CLSSection, OptimConfig, TrainConfig, load_config
from vltrain.data.labels import ClassificationDataset, ClsCollator, LabelSpec
from vltrain.data.media import MediaOptions
from vltrain.families import family_spec, get_module
from vltrain.tiny import build_tiny

from conftest import FAMILIES, REPO
from sigterm import sigterm_at


def cls_records() -> list[dict]:
    """Text-only, one image, two images and a video, prompts of different lengths; labels as names and digit strings."""
    return [
        {"id": "text", "prompt": "Is this sentence about a cat, a dog or a bird? It purrs.", "label": "cat"},
        {"id": "img", "image": "a.png", "label": "1"},
        {"id": "multi", "image": ["a.png", "b.png"], "prompt": "<image>\n<image>\nWhich animal?", "label": "bird"},
        {"id": "vid", "video": "clip.mp4", "prompt": "What animal is in the video?", "label": 0},
    ]


@pytest.fixture
def cls_data(media_dir):
    path = media_dir / "cls.json"
    path.write_text(json.dumps(cls_records()))
    return path


def cls_config(tmp_path, train_path, model_type="qwen2_5_vl", **overrides) -> CLSConfig:
    base = {
        "model.name_or_path": f"tiny:{model_type}", "model.dtype": "float32", "model.attn_implementation": "sdpa",
        "data.train_path": str(train_path), "data.image_folder": str(train_path.parent), "data.num_workers": 0,
        "data.max_seq_length": 1024, "data.nframes": 4, "data.image_max_pixels": 64 * 64 * 2,
        "data.video_max_pixels": 64 * 64, "cls.classes": "[cat,dog,bird]", "optim.lr": 3e-3, "optim.warmup_steps": 0,
        "optim.scheduler": "constant", "train.output_dir": str(tmp_path / "out"), "train.report_to": "none",
        "train.max_steps": 4, "train.micro_batch_size": 2, "train.log_every": 1,
    }
    base.update(overrides)
    return load_config(CLSConfig, None, [f"{k}={v}" for k, v in base.items()])


def _dataset(model_type, processor, path, spec=LabelSpec("single_label", 3, ("cat", "dog", "bird"))):
    media = MediaOptions(image_factor=family_spec(model_type).image_factor, image_max_pixels=64 * 64 * 2,
                         video_max_pixels=64 * 64, nframes=4)
    return ClassificationDataset(path, processor, media, spec=spec, max_seq_length=1024, image_folder=str(path.parent))


def _collate(model, processor, packing):
    return ClsCollator(model.config, packing=packing, pad_token_id=processor.tokenizer.pad_token_id,
                       problem_type="single_label")


def _left_padded(batch: dict, pad_token_id: int) -> dict:
    """The right-padded batch moved to left padding (same tokens, same masks, flipped padding side)."""
    out = dict(batch)
    mask = batch["attention_mask"]
    for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        rows = []
        for row, m in zip(batch[key], mask):
            n = int(m.sum())
            rows.append(torch.cat([torch.full((len(row) - n,), fill, dtype=row.dtype), row[:n]]))
        out[key] = torch.stack(rows)
    return out


def test_last_token_positions_right_left_and_packed():
    right = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    assert last_token_positions(right)[1].tolist() == [2, 4]
    left = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])}
    assert last_token_positions(left)[1].tolist() == [4, 4]
    pos = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])
    packed = {"input_ids": torch.zeros(1, 9, dtype=torch.long), "position_ids": pos.expand(4, 1, 9)}
    rows, cols = last_token_positions(packed)
    assert rows.tolist() == [0, 0, 0] and cols.tolist() == [2, 4, 8]


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_scores_are_the_same_alone_padded_left_padded_and_packed(model_type, cls_data):
    """Pooling picks each example's last real token: batch-of-1, right padding, left padding and packing agree."""
    backbone, processor = build_tiny(model_type)
    model = VLClassifier(backbone, HeadSpec(num_labels=3)).eval()
    packed_model = copy.deepcopy(model)
    enable_packed_attention(packed_model.backbone)  # what build_model does with data.packing
    dataset = _dataset(model_type, processor, cls_data)
    examples = [dataset[i] for i in range(len(dataset))]
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        alone = torch.cat([model(**_collate(backbone, processor, False)([e])) for e in examples])
        padded = _collate(backbone, processor, False)(examples)
        right = model(**padded)
        left = model(**_left_padded(padded, pad))
        packed = packed_model(**_collate(backbone, processor, True)(examples))
    assert right.shape == (4, 3) and packed.shape == (4, 3)
    for other in (right, left, packed):
        torch.testing.assert_close(other, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone[0], alone[1])  # the examples really differ


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_family_scores_a_mixed_batch_and_trains_the_head_and_backbone(model_type, cls_data):
    backbone, processor = build_tiny(model_type)
    model = VLClassifier(backbone, HeadSpec(num_labels=3, mlp_head_dim=8))
    dataset = _dataset(model_type, processor, cls_data)
    batch = _collate(backbone, processor, False)([dataset[i] for i in range(len(dataset))])
    logits = model(**batch)
    assert logits.shape == (4, 3) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, batch["target"]).backward()
    assert model.head[0].weight.grad.abs().sum() > 0
    assert get_module(backbone, family_spec(backbone).vision_module).patch_embed.proj.weight.grad.abs().sum() > 0


def test_the_lm_head_never_runs(cls_data):
    backbone, processor = build_tiny("qwen2_5_vl")
    model = VLClassifier(backbone, HeadSpec(num_labels=3))
    calls = []
    backbone.lm_head.register_forward_hook(lambda *a: calls.append(1))
    batch = _collate(backbone, processor, False)([_dataset("qwen2_5_vl", processor, cls_data)[1]])
    model(**batch).sum().backward()
    assert not calls and backbone.lm_head.weight.grad is None and not backbone.lm_head.weight.requires_grad
    assert model.head.weight.grad is not None


def test_lora_head_gets_no_adapters_and_its_own_learning_rate(tmp_path, cls_data):
    from vltrain.build import build_model
    from vltrain.optim import build_optimizer

    cfg = cls_config(tmp_path, cls_data, **{"lora.enabled": "true", "lora.rank": 4, "lora.alpha": 8,
                                            "trainable.freeze_llm": "true", "optim.head_lr": 0.05,
                                            "cls.mlp_head_dim": 16, "cls.mlp_head_dropout": 0.1})
    built = build_model(cfg.model, cfg.trainable, cfg.lora, allow_frozen=True)
    model = VLClassifier(built.model, HeadSpec.from_config(cfg.cls))
    head_names = [n for n, _ in model.named_parameters() if n.startswith("head.")]
    assert head_names and not any("lora" in n for n in head_names)
    assert all(p.requires_grad for p in model.head.parameters())
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    groups = {g["name"]: g for g in build_optimizer(model, cfg.optim).param_groups}
    head_ids = {id(p) for p in model.head.parameters()}
    assert {id(p) for name in ("head", "head_no_decay") for p in groups[name]["params"]} == head_ids
    assert groups["head"]["lr"] == 0.05 and groups["llm"]["lr"] == cfg.optim.lr


@pytest.mark.parametrize("frozen", [["freeze_llm"], ["freeze_llm", "freeze_vision_tower", "freeze_merger"]],
                         ids=["frozen_llm", "linear_probe"])
def test_a_frozen_llm_or_a_fully_frozen_backbone_trains(tmp_path, cls_data, frozen):
    from recipes.cls import main

    cfg = cls_config(tmp_path, cls_data, **{f"trainable.{name}": "true" for name in frozen},
                     **{"train.max_steps": 6, "train.micro_batch_size": 4, "data.eval_path": str(cls_data)})
    summary = main(cfg)
    assert summary["steps"] == 6 and summary["eval"][-1]["loss"] < summary["eval"][0]["loss"]


def test_research_code_trains_with_objects_it_builds_itself(tmp_path, cls_data):
    """`from loops.cls import train` with a hand-built model, loader and accelerator: the loss falls."""
    backbone, processor = build_tiny("qwen2_5_vl")
    model = VLClassifier(backbone, HeadSpec(num_labels=3))
    loader = DataLoader(_dataset("qwen2_5_vl", processor, cls_data), batch_size=4,
                        collate_fn=_collate(backbone, processor, False))
    accelerator = Accelerator(cpu=True)
    cls_cfg = CLSSection(classes=["cat", "dog", "bird"])
    cls_cfg.validate()
    result = train(accelerator, model, loader, TrainConfig(output_dir=str(tmp_path), max_steps=12, report_to="none",
                                                           log_every=4),
                   OptimConfig(lr=3e-3, warmup_steps=0, scheduler="constant"), cls_cfg)
    assert result.step == 12 and result.losses[-1] < 0.5 * result.losses[0]


def test_early_stopping_stops_at_the_right_step(tmp_path, cls_data):
    """lr 0: nothing improves after the first evaluation, so patience 2 stops after the 3rd evaluation (step 3)."""
    from recipes.cls import main

    cfg = cls_config(tmp_path, cls_data, **{"data.eval_path": str(cls_data), "optim.lr": 0.0, "train.max_steps": 10,
                                            "train.eval_every": 1, "cls.early_stopping_patience": 2,
                                            "cls.early_stopping_threshold": 0.0})
    summary = main(cfg)
    assert summary["stopped_early"] and summary["steps"] == 3
    assert [e["step"] for e in summary["eval"]] == [0, 1, 2, 3]
    assert summary["best"]["step"] == 1 and (tmp_path / "out" / "best" / "head.safetensors").is_file()


def test_export_reloads_and_predicts_what_the_trained_model_predicted(tmp_path, cls_data):
    from loops.cls import predict
    from recipes.cls import main
    from vltrain.predict import predict_file

    captured = {}
    import recipes.cls as recipe

    real_train = recipe.train

    def capture(accelerator, *args, **kwargs):
        result = real_train(accelerator, *args, **kwargs)
        captured["rows"] = predict(accelerator, result.model, accelerator.prepare(
            DataLoader(args[1].dataset, batch_size=1, collate_fn=args[1].collate_fn)))
        return result

    recipe.train = capture
    try:
        summary = main(cls_config(tmp_path, cls_data, **{"data.eval_path": str(cls_data), "train.max_steps": 6,
                                                         "cls.mlp_head_dim": 8}))
    finally:
        recipe.train = real_train
    model, processor = load_classifier(summary["export_dir"])
    assert model.spec.classes == ("cat", "dog", "bird") and model.spec.mlp_head_dim == 8
    out = tmp_path / "preds.jsonl"
    report = predict_file(summary["export_dir"], cls_data, out, batch_size=3, image_folder=str(cls_data.parent))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["text", "img", "multi", "vid"]
    trained = {r["id"]: torch.tensor(r["logits"]).softmax(-1) for r in captured["rows"]}
    for line in lines:
        probs = torch.tensor([line["probabilities"][c] for c in ("cat", "dog", "bird")])
        torch.testing.assert_close(probs, trained[line["id"]], rtol=1e-4, atol=1e-5)
        assert line["label"] == ("cat", "dog", "bird")[int(trained[line["id"]].argmax())]
    assert [line["target"] for line in lines] == [0, 1, 2, 0]
    assert report["metrics"]["accuracy"] == pytest.approx(summary["eval"][-1]["accuracy"])
    assert json.loads(out.with_suffix(".metrics.json").read_text())["confusion_matrix"]


def test_lora_export_reloads_with_the_same_scores(tmp_path, cls_data):
    from recipes.cls import main

    from vltrain.predict import predict_file

    summary = main(cls_config(tmp_path, cls_data, **{"lora.enabled": "true", "lora.rank": 4, "lora.alpha": 8,
                                                     "trainable.freeze_llm": "true", "data.eval_path": str(cls_data),
                                                     "train.max_steps": 3, "lora.merge_on_export": "true"}))
    final = tmp_path / "out" / "final"
    assert (final / "adapter" / "adapter_config.json").is_file() and (final / "merged" / "config.json").is_file()
    merged = predict_file(final, cls_data, tmp_path / "merged.jsonl", image_folder=str(cls_data.parent))
    shutil.rmtree(final / "merged")  # now the adapter path: the same export without its merged copy
    from_adapter = predict_file(final, cls_data, tmp_path / "adapter.jsonl", image_folder=str(cls_data.parent))
    for report in (merged, from_adapter):
        assert report["metrics"]["accuracy"] == pytest.approx(summary["eval"][-1]["accuracy"])
        assert report["metrics"]["macro_f1"] == pytest.approx(summary["eval"][-1]["macro_f1"])
    a, b = ([json.loads(x)["probabilities"] for x in (tmp_path / f).read_text().splitlines()]
            for f in ("merged.jsonl", "adapter.jsonl"))
    assert all(pa == pytest.approx(pb, abs=1e-5) for pa, pb in zip(a, b))


def test_resume_from_a_checkpoint_gives_the_straight_run(tmp_path, cls_data):
    from recipes.cls import main

    over = {"train.micro_batch_size": 1, "data.eval_path": str(cls_data), "train.eval_every": 2,
            "cls.early_stopping_patience": 5}
    straight = main(cls_config(tmp_path / "straight", cls_data, **over, **{"train.max_steps": 6}))
    main(cls_config(tmp_path / "cut", cls_data, **over, **{"train.max_steps": 3, "train.save_every": 3}))
    resumed = main(cls_config(tmp_path / "cut", cls_data, **over, **{"train.max_steps": 6, "train.resume": "auto"}))
    assert resumed["steps"] == 6
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5, abs=1e-6)
    assert resumed["best"]["step"] == straight["best"]["step"]


def test_sigterm_checkpoints_exits_0_and_resumes_to_the_straight_run(tmp_path, cls_data):
    from recipes.cls import main

    over = {"train.max_steps": 40, "train.micro_batch_size": 1, "data.num_workers": 1}
    cfg = cls_config(tmp_path / "run", cls_data, **over)
    args = [f"model.name_or_path={cfg.model.name_or_path}", "model.dtype=float32", "model.attn_implementation=sdpa",
            f"data.train_path={cls_data}", f"data.image_folder={cls_data.parent}", "data.num_workers=1",
            "data.nframes=4", f"data.image_max_pixels={64 * 64 * 2}", f"data.video_max_pixels={64 * 64}",
            "cls.classes=[cat,dog,bird]", "optim.lr=3e-3", "optim.warmup_steps=0", "optim.scheduler=constant",
            "train.report_to=none", f"train.output_dir={tmp_path / 'run' / 'out'}", "train.max_steps=40",
            "train.micro_batch_size=1", "train.log_every=1"]
    returncode, output = sigterm_at(REPO / "recipes" / "cls.py", args, "step  3/40")
    assert returncode == 0 and "Traceback" not in output, output[-3000:]
    summary = json.loads((tmp_path / "run" / "out" / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["preempted"] == "SIGTERM" and 3 <= stopped < 40 and summary["export_dir"] is None
    assert (tmp_path / "run" / "out" / "checkpoints" / f"step_{stopped:06d}" / "COMPLETE").is_file()
    resumed = main(cls_config(tmp_path / "run", cls_data, **over, **{"train.resume": "auto"}))
    assert resumed["steps"] == 40 and resumed["losses"][:stopped] == summary["losses"]
    straight = main(cls_config(tmp_path / "straight", cls_data, **over))
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss_type, extra", [("focal_loss", {"cls.focal_gamma": 1.5, "cls.focal_alpha": "[1,2,1]"}),
                                              ("class_balanced_cross_entropy", {"cls.label_smoothing": 0.1}),
                                              ("class_balanced_focal_loss", {})])
def test_every_single_label_loss_trains(tmp_path, cls_data, loss_type, extra):
    from recipes.cls import main

    summary = main(cls_config(tmp_path, cls_data, **{"cls.loss_type": loss_type, "train.max_steps": 8,
                                                     "train.micro_batch_size": 4, "optim.lr": 1e-3,
                                                     "data.eval_path": str(cls_data), "cls.balanced_sampler": "true",
                                                     **extra}))
    assert summary["eval"][-1]["loss"] < 0.5 * summary["eval"][0]["loss"]


def test_multi_label_and_regression_train(tmp_path, media_dir):
    from recipes.cls import main

    multi = media_dir / "multi.json"
    multi.write_text(json.dumps([{"id": "a", "image": "a.png", "label": ["cat", "dog"]},
                                 {"id": "b", "prompt": "text only", "label": ["bird"]}]))
    summary = main(cls_config(tmp_path / "m", multi, **{"cls.problem_type": "multi_label", "train.max_steps": 6,
                                                         "data.eval_path": str(multi)}))
    assert summary["eval"][-1]["loss"] < summary["eval"][0]["loss"] and "micro_f1" in summary["eval"][-1]
    reg = media_dir / "reg.json"
    reg.write_text(json.dumps([{"id": "a", "image": "a.png", "label": 2.5}, {"id": "b", "prompt": "t", "label": -1.0}]))
    summary = main(cls_config(tmp_path / "r", reg, **{"cls.problem_type": "regression", "cls.classes": "null",
                                                       "train.max_steps": 8, "data.eval_path": str(reg)}))
    assert summary["eval"][-1]["loss"] < summary["eval"][0]["loss"] and "r2" in summary["eval"][-1]


@pytest.mark.parametrize("overrides, field", [
    ({"cls.focal_gamma": 1.0}, "cls.focal_gamma"),  # orphaned: the loss is cross_entropy
    ({"cls.loss_type": "bce"}, "cls.loss_type"),  # bce is multi-label
    ({"cls.num_labels": 4}, "cls.num_labels"),  # three class names
    ({"cls.early_stopping_patience": 2}, "cls.early_stopping_patience"),  # no eval data
    ({"cls.metric_for_best": "r2"}, "cls.metric_for_best"),
    ({"cls.mlp_head_dropout": 0.1}, "cls.mlp_head_dropout"),
])
def test_config_mistakes_name_the_field(tmp_path, cls_data, overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        cls_config(tmp_path, cls_data, **overrides)


def test_head_lr_is_refused_outside_classification(tmp_path, cls_data):
    from vltrain.config import SFTConfig

    with pytest.raises(ValueError, match="optim.head_lr"):
        load_config(SFTConfig, None, [f"data.train_path={cls_data}", "optim.head_lr=1e-3"])


def test_two_process_cpu_run(tmp_path, cls_data):
    """accelerate launch --multi_gpu --num_processes 2 on CPU (gloo): trains packed, evaluates each sample once, exports."""
    args = [f"data.train_path={cls_data}", f"data.eval_path={cls_data}", f"data.image_folder={cls_data.parent}",
            "model.name_or_path=tiny:qwen2_5_vl", "model.dtype=float32", "model.attn_implementation=sdpa",
            "data.num_workers=0", "data.nframes=4", f"data.image_max_pixels={64 * 64 * 2}",
            f"data.video_max_pixels={64 * 64}", "data.packing=true", "cls.classes=[cat,dog,bird]", "train.report_to=none",
            "train.max_steps=3", "train.micro_batch_size=1", f"train.output_dir={tmp_path / 'out'}", "optim.warmup_steps=0",
            "optim.lr=3e-3"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29539",
           str(REPO / "recipes" / "cls.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3 and "2 process(es) = 2 samples/step" in proc.stdout
    assert summary["eval"][-1]["num_examples"] == 4  # every eval sample once, gathered from both ranks
    assert sum(sum(row) for row in summary["eval"][-1]["confusion_matrix"]) == 4
    assert (tmp_path / "out" / "final" / "head.safetensors").is_file()


@pytest.mark.slow
def test_demo_classifies_the_shapes(tmp_path):
    """`accelerate launch recipes/cls.py`: held-out accuracy >= 90% (the issue's target) and macro-F1 printed."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/cls.py", "cls_demo",
           f"train.output_dir={tmp_path / 'cls'}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"demo wall time: {time.monotonic() - start:.0f} s")
    summary = json.loads((tmp_path / "cls" / "summary.json").read_text())
    assert summary["eval"][0]["step"] == 0 and summary["eval"][0]["accuracy"] < 0.5
    assert summary["best"]["accuracy"] >= 0.90, summary["best"]
    assert "held-out accuracy and macro_f1" in proc.stdout
    assert (tmp_path / "cls" / "best" / "head.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_gpu_bf16_packed_with_kernels_matches_padded(model_type, cls_data):
    """bf16 on CUDA with every kernel: a packed row of the four examples scores as the padded batch does."""
    from vltrain.build import build_model
    from vltrain.config import LoraConfig, ModelConfig, TrainableConfig

    model_cfg = ModelConfig(name_or_path=f"tiny:{model_type}", dtype="bfloat16", attn_implementation="sdpa", kernels=["all"])
    padded_model = VLClassifier(build_model(model_cfg, TrainableConfig(), LoraConfig()).model, HeadSpec(num_labels=3))
    built = build_model(model_cfg, TrainableConfig(), LoraConfig(), packing=True)
    packed_model = VLClassifier(built.model, HeadSpec(num_labels=3))
    packed_model.head.load_state_dict(padded_model.head.state_dict())
    padded_model, packed_model = padded_model.cuda().eval(), packed_model.cuda().eval()
    ds = _dataset(model_type, built.processor, cls_data)
    examples = [ds[i] for i in range(4)]
    on_gpu = lambda b: {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    with torch.no_grad():
        padded = padded_model(**on_gpu(_collate(built.model, built.processor, False)(examples)))
        packed = packed_model(**on_gpu(_collate(built.model, built.processor, True)(examples)))
    assert packed.shape == (4, 3) and torch.isfinite(packed).all()
    torch.testing.assert_close(packed, padded, rtol=0.05, atol=0.05)


@pytest.mark.gpu
def test_gpu_fsdp2_run_trains_evaluates_and_exports(tmp_path, cls_data):
    """accelerate launch --config_file accelerate_configs/fsdp2.yaml (one GPU process): the head sits in the root
    FSDP unit, the backbone's layers in their own; the export reloads and scores as the run's last evaluation."""
    args = [f"data.train_path={cls_data}", f"data.eval_path={cls_data}", f"data.image_folder={cls_data.parent}",
            "model.name_or_path=tiny:qwen2_5_vl", "model.dtype=float32", "model.attn_implementation=sdpa",
            "data.num_workers=0", "data.nframes=4", f"data.image_max_pixels={64 * 64 * 2}",
            f"data.video_max_pixels={64 * 64}", "cls.classes=[cat,dog,bird]", "train.report_to=none",
            "train.max_steps=4", "train.micro_batch_size=2", f"train.output_dir={tmp_path / 'out'}",
            "optim.warmup_steps=0", "optim.lr=3e-3"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs" / "fsdp2.yaml"), "--num_processes", "1", "--mixed_precision", "no",
           str(REPO / "recipes" / "cls.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval"][-1]["num_examples"] == 4
    from vltrain.predict import predict_file

    report = predict_file(summary["export_dir"], cls_data, tmp_path / "p.jsonl", image_folder=str(cls_data.parent))
    assert report["metrics"]["accuracy"] == pytest.approx(summary["eval"][-1]["accuracy"])
