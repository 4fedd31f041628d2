from pathlib import Path

import pytest

from vltrain.config import SFTConfig, dump_config, load_config

from conftest import REPO


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(SFTConfig, path, ["data.train_path=x.json"])
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
    from recipes.sft import DEFAULT_CONFIG, setup

    assert setup([]) == load_config(SFTConfig, DEFAULT_CONFIG)
    assert setup(["train.max_steps=3"]).train.max_steps == 3
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train_path: x.json\ntrain:\n  seed: 5\n")
    cfg = setup([str(path), "train.seed=6"])
    assert cfg.train.seed == 6 and cfg.data.train_path == "x.json"
    with pytest.raises(ValueError, match="does not exist"):
        setup([str(tmp_path / "missing.yaml")])


def test_recipe_reports_bad_config_and_bad_data_in_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "broken", "image": ["a.png", "b.png"], "conversations": '
                   '[{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]}]')
    runs = {
        "config": ["optim.lr=abc"],
        "data": [f"data.train_path={bad}", f"train.output_dir={tmp_path / 'out'}", "train.report_to=none"],
    }
    for kind, args in runs.items():
        proc = subprocess.run([sys.executable, "recipes/sft.py", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"{kind} error:") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "sample 0 (id='broken')" in last and "placeholders" in last
