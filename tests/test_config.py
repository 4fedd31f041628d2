from pathlib import Path

import pytest

from vltrain.config import CLSConfig, DPOConfig, GRPOConfig, SFTConfig, dump_config, load_config

from conftest import REPO


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, tmp_path):
    cls = (DPOConfig if path.name.startswith("dpo") else GRPOConfig if path.name.startswith("grpo_") and "sft" not in path.name
           else CLSConfig if path.name.startswith("cls_") else SFTConfig)
    # the non-demo configs are templates: their data paths are placeholders the header's command replaces (a missing
    # media folder is a config error, vltrain.config; a missing data file one of vltrain.run.open_run)
    placeholders = ["data.train_path=x.json", f"data.image_folder={tmp_path}"]
    cfg = load_config(cls, path, [] if "demo" in path.name else placeholders)
    assert cfg.model.name_or_path
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), "each shipped config opens with a comment"
    assert "accelerate launch" in path.read_text(), "each shipped config gives the command that runs it"


def test_overrides_are_typed():
    cfg = load_config(SFTConfig, None, ["optim.lr=3e-4", "train.max_steps=7", "optim.betas=[0.9,0.95]",
                                        "trainable.freeze_llm=true", "data.fps=none", "model.kernels=a,b"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.trainable.freeze_llm is True and cfg.data.fps is None
    assert cfg.model.kernels == ["a", "b"]


@pytest.mark.parametrize("overrides, field", [
    (["optim.lrr=1"], "optim.lrr"),
    (["train.micro_batch_size=many"], "train.micro_batch_size"),
    (["model.dtype=fp8"], "model.dtype"),
    (["data.fps=2", "data.nframes=8"], "data.fps"),
    (["trainable.unfreeze_topk_llm=2"], "trainable.unfreeze_topk_llm"),
    (["data.image_min_pixels=100", "data.image_max_pixels=10"], "data.image_min_pixels"),
    (["data.image_resized_width=448"], "data.image_resized_width"),
    (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps"),
    (["model.gradient_checkpointing=maybe"], "model.gradient_checkpointing"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(SFTConfig, None, ["data.train_path=x.json", *overrides])


def test_dump_and_reload_roundtrip(tmp_path):
    cfg = load_config(SFTConfig, None, ["data.train_path=x.json", "optim.vision_lr=2e-6", "train.seed=3"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(SFTConfig, tmp_path / "c.yaml") == cfg


def test_recipe_argv_parsing(tmp_path):
    from recipes.sft import setup
    from vltrain.run import CONFIGS_DIR

    demo = load_config(SFTConfig, CONFIGS_DIR / "demo.yaml")
    assert setup([]) == demo  # no argument at all: the demo
    assert setup(["demo", "train.max_steps=3"]).train.max_steps == 3  # a shipped config by name
    assert setup(["demo", "train.max_steps=3"]).data.max_seq_length == demo.data.max_seq_length
    # overrides alone start from the dataclass defaults, never silently from the demo
    alone = setup(["train.max_steps=3"])
    assert alone.train.max_steps == 3 and alone.data.max_seq_length == SFTConfig().data.max_seq_length != 256
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train_path: x.json\ntrain:\n  seed: 5\n")
    cfg = setup([str(path), "train.seed=6"])
    assert cfg.train.seed == 6 and cfg.data.train_path == "x.json"
    with pytest.raises(ValueError, match="does not exist"):
        setup([str(tmp_path / "missing.yaml")])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  train_path: x.json\ntrain:\n  seed: [5\n  lr: 3\n")
    with pytest.raises(ValueError, match=rf"{path}:\d+:\d+: not valid YAML"):
        load_config(SFTConfig, path)


@pytest.mark.parametrize("overrides, field", [
    (["lora.rank=8"], "lora.rank"),
    (["lora.alpha=16"], "lora.alpha"),
    (["lora.namespan_exclude=[mlp]"], "lora.namespan_exclude"),
    (["train.eval_every=5"], "train.eval_every"),
    (["train.eval_exact_match=10"], "train.eval_exact_match"),
])
def test_orphaned_options_are_errors(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(SFTConfig, None, ["data.train_path=x.json", *overrides])
    # the same options are fine with what they depend on
    extra = ["lora.enabled=true", "trainable.freeze_llm=true"] if field.startswith("lora") else ["data.eval_path=e.json"]
    load_config(SFTConfig, None, ["data.train_path=x.json", *overrides, *extra])


def test_model_paths_that_are_not_models_give_one_line_errors(tmp_path):
    from vltrain.config import ModelConfig
    from vltrain.models import load_model

    (tmp_path / "weights.bin").write_text("x")
    (tmp_path / "empty").mkdir()
    for name, message in [(tmp_path / "weights.bin", "is a file"), (tmp_path / "empty", "without config.json"),
                          (tmp_path / "nowhere" / "model", "no such folder")]:
        with pytest.raises(ValueError, match=message):
            load_model(ModelConfig(name_or_path=str(name), attn_implementation="sdpa"))
