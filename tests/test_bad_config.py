"""Config mistakes (issue #16): every case is fed to every loop that reads it (SFTConfig, DPOConfig, GRPOConfig,
CLSConfig) and must end in one ValueError line that names the dotted field and the reason, while its valid
neighbours still load (the check is not over-eager). Then: non-finite numbers in every float field (YAML `.nan`,
`.inf`), did-you-mean for unknown fields, and that these errors come before any model loads (in-process through
vltrain.run.run_recipe, and once through `python recipes/sft.py` with a missing train.resume folder)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import typing
from typing import NamedTuple

import pytest
import yaml

from vltrain.config import CLSConfig, DPOConfig, GRPOConfig, SFTConfig, load_config

from conftest import REPO

LOOPS = {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "cls": CLSConfig}
# A valid config of each loop, without files: data files are checked when the run opens (vltrain.run.open_run)
BASE = {"sft": ["data.train_path=x.json"], "dpo": ["data.train_path=x.json"], "grpo": ["data.train_path=x.json"],
        "cls": ["data.train_path=x.json", "cls.classes=[cat,dog]"]}
ALL, TRAINERS = ("sft", "dpo", "grpo", "cls"), ("sft", "dpo", "grpo")  # TRAINERS: the loops without a head
FROZEN = ["trainable.freeze_vision_tower=true", "trainable.freeze_merger=true", "trainable.freeze_llm=true"]
LORA = ["trainable.freeze_llm=true", "lora.enabled=true"]
VISION_LORA = [*FROZEN, "lora.enabled=true", "lora.vision_lora=true"]


class Case(NamedTuple):
    name: str
    bad: list[str]  # overrides on top of BASE; "{tmp}" is the test's folder (see `folders`)
    match: str  # a regex the one-line message must match: the dotted field and the reason
    good: list[list[str]]  # valid neighbours: each must load
    loops: tuple[str, ...] = ALL


CASES = [
    # ---------------------------------------------------------------- unknown fields and wrong types
    Case("unknown_upstream_name", ["optim.learning_rate=1e-5"],
         r"^unknown config field 'optim\.learning_rate'; did you mean 'optim\.lr'\?", [["optim.lr=1e-5"]]),
    Case("unknown_typo", ["train.max_step=3"],
         r"^unknown config field 'train\.max_step'; did you mean 'train\.max_steps'\?", [["train.max_steps=3"]]),
    Case("unknown_wrong_section", ["train.lr=1e-5"],
         r"^unknown config field 'train\.lr'; did you mean 'optim\.lr'\?", [["optim.lr=1e-5"]]),
    Case("unknown_section", ["optimizer.lr=1e-5"],
         r"^unknown config field 'optimizer'; did you mean 'optim'\?", [["optim.lr=1e-5"]]),
    Case("wrong_type_int", ["train.micro_batch_size=two"], r"train\.micro_batch_size must be an integer",
         [["train.micro_batch_size=2"]]),
    Case("wrong_type_bool", ["model.gradient_checkpointing=maybe"],
         r"model\.gradient_checkpointing must be true or false", [["model.gradient_checkpointing=true"]]),
    Case("wrong_choice", ["optim.scheduler=cosine_with_restarts"], r"optim\.scheduler must be one of",
         [["optim.scheduler=linear"]]),
    # ---------------------------------------------------------------- non-finite numbers (also: test_non_finite_*)
    Case("nan_lr", ["optim.lr=nan"], r"optim\.lr must be a finite number", [["optim.lr=1e-5"]]),
    Case("inf_grad_norm", ["optim.max_grad_norm=inf"], r"optim\.max_grad_norm must be a finite number",
         [["optim.max_grad_norm=0"]]),
    Case("minus_inf_warmup", ["optim.warmup_ratio=-inf"], r"optim\.warmup_ratio must be a finite number",
         [["optim.warmup_ratio=0"]]),
    Case("nan_in_a_list", ["data.train_path=[a.json,b.json]", "data.weights=[.nan,1.0]"],
         r"data\.weights\[0\] must be a finite number",
         [["data.train_path=[a.json,b.json]", "data.weights=[0.5,1.0]"]]),
    # ---------------------------------------------------------------- optim ranges and orphans
    Case("negative_grad_norm", ["optim.max_grad_norm=-1"], r"optim\.max_grad_norm must be >= 0",
         [["optim.max_grad_norm=0"], ["optim.max_grad_norm=0.5"]]),
    Case("zero_eps", ["optim.eps=0"], r"optim\.eps must be > 0", [["optim.eps=1e-6"]]),
    Case("beta_of_one", ["optim.betas=[0.9,1.0]"], r"optim\.betas\[1\] must be in \[0, 1\)",
         [["optim.betas=[0.9,0.95]"], ["optim.betas=[0.0,0.0]"]]),
    Case("negative_beta", ["optim.betas=[-0.1,0.999]"], r"optim\.betas\[0\] must be in \[0, 1\)",
         [["optim.betas=[0.5,0.999]"]]),
    Case("negative_warmup_steps", ["optim.warmup_steps=-1"], r"optim\.warmup_steps must be >= 0",
         [["optim.warmup_steps=0"], ["optim.warmup_steps=10"], ["optim.warmup_steps=null"]]),
    Case("min_lr_ratio_above_one", ["optim.min_lr_ratio=1.5"], r"optim\.min_lr_ratio must be in \[0, 1\]",
         [["optim.min_lr_ratio=1"], ["optim.min_lr_ratio=0.1"]]),
    Case("negative_min_lr_ratio", ["optim.min_lr_ratio=-0.1"], r"optim\.min_lr_ratio must be in \[0, 1\]",
         [["optim.min_lr_ratio=0"]]),
    Case("min_lr_ratio_without_decay", ["optim.scheduler=constant", "optim.min_lr_ratio=0.1"],
         r"optim\.min_lr_ratio=0\.1 is where a decay ends, but optim\.scheduler=constant does not decay",
         [["optim.scheduler=cosine", "optim.min_lr_ratio=0.1"], ["optim.scheduler=linear", "optim.min_lr_ratio=0.1"],
          ["optim.scheduler=constant"]]),
    Case("vision_lr_of_a_frozen_tower", ["trainable.freeze_vision_tower=true", "optim.vision_lr=1e-6"],
         r"optim\.vision_lr=1e-06 is set but nothing in the vision tower trains",
         [["optim.vision_lr=1e-6"], ["trainable.freeze_vision_tower=true", "trainable.unfreeze_topk_vision=1",
                                     "optim.vision_lr=1e-6"],
          [*VISION_LORA, "optim.vision_lr=1e-6"]]),  # vision adapters are in the vision group (vltrain.trainable)
    Case("merger_lr_of_a_frozen_merger", ["trainable.freeze_merger=true", "optim.merger_lr=1e-5"],
         r"optim\.merger_lr=1e-05 is set but the merger does not train",
         [["optim.merger_lr=1e-5"], ["trainable.freeze_vision_tower=true", "optim.merger_lr=1e-5"],
          [*VISION_LORA, "lora.vision_lora_merger=true", "optim.merger_lr=1e-5"]]),
    # ---------------------------------------------------------------- trainable
    Case("negative_topk_llm", ["trainable.freeze_llm=true", "trainable.unfreeze_topk_llm=-1"],
         r"trainable\.unfreeze_topk_llm must be >= 0",
         [["trainable.freeze_llm=true", "trainable.unfreeze_topk_llm=1"]]),
    Case("negative_topk_vision", ["trainable.freeze_vision_tower=true", "trainable.unfreeze_topk_vision=-2"],
         r"trainable\.unfreeze_topk_vision must be >= 0",
         [["trainable.freeze_vision_tower=true", "trainable.unfreeze_topk_vision=2"]]),
    Case("nothing_to_train", FROZEN, r"trainable\.freeze_vision_tower, .* are all true.*: nothing to train",
         [[*FROZEN, "lora.enabled=true"], [*FROZEN, "trainable.unfreeze_topk_llm=1"],
          [*FROZEN, "trainable.unfreeze_topk_vision=1"], FROZEN[:2]], TRAINERS),
    # ---------------------------------------------------------------- lora
    Case("zero_lora_alpha", [*LORA, "lora.alpha=0"], r"lora\.alpha must be > 0", [[*LORA, "lora.alpha=16"]]),
    Case("negative_lora_alpha", [*LORA, "lora.alpha=-8"], r"lora\.alpha must be > 0", [[*LORA, "lora.alpha=1"]]),
    # ---------------------------------------------------------------- train
    Case("negative_save_every", ["train.save_every=-1"], r"train\.save_every must be >= 0",
         [["train.save_every=0"], ["train.save_every=10"]]),
    Case("zero_log_every", ["train.log_every=0"], r"train\.log_every must be >= 1", [["train.log_every=1"]]),
    # the reason must be the sign, not "needs data.eval_path" (what the check said before)
    Case("negative_eval_every", ["train.eval_every=-5"], r"train\.eval_every must be >= 0",
         [["data.eval_path=e.json", "train.eval_every=5"], ["train.eval_every=0"]]),
    Case("negative_eval_every_with_eval_data", ["data.eval_path=e.json", "train.eval_every=-5"],
         r"train\.eval_every must be >= 0", [["data.eval_path=e.json", "train.eval_every=0"]]),
    Case("zero_max_steps", ["train.max_steps=0"], r"train\.max_steps must be > 0, or -1",
         [["train.max_steps=-1"], ["train.max_steps=5"]]),
    Case("negative_epochs", ["train.num_epochs=-1"], r"train\.num_epochs must be >= 0",
         [["train.num_epochs=0.5"], ["train.num_epochs=0", "train.max_steps=10"]]),
    Case("no_epochs_no_steps", ["train.num_epochs=0"], r"train\.num_epochs=0 with train\.max_steps=-1 trains nothing",
         [["train.num_epochs=0", "train.max_steps=3"]]),
    Case("negative_exact_match", ["data.eval_path=e.json", "train.eval_exact_match=-1"],
         r"train\.eval_exact_match must be >= 0", [["data.eval_path=e.json", "train.eval_exact_match=4"]], ("sft",)),
    Case("run_name_without_tracker", ["train.run_name=first", "train.report_to=none"],
         r"train\.run_name='first' names a tracker run, but train\.report_to=none",
         [["train.run_name=first", "train.report_to=tensorboard"], ["train.report_to=none"]]),
    Case("resume_missing", ["train.resume={tmp}/nowhere"], r"train\.resume='.*/nowhere': no such folder",
         [["train.resume={tmp}/out/checkpoints/step_000002"], ["train.resume=auto"], ["train.resume=null"]]),
    Case("resume_incomplete", ["train.resume={tmp}/out/checkpoints/step_000003"],
         r"train\.resume='.*step_000003' is not a complete checkpoint \(no COMPLETE marker\)$",
         [["train.resume={tmp}/out/checkpoints/step_000002"]]),
    Case("resume_the_checkpoints_folder", ["train.resume={tmp}/out/checkpoints"],
         r"train\.resume='.*/checkpoints' is not a complete checkpoint .*pick one step_N in it",
         [["train.resume={tmp}/out/checkpoints/step_000002"], ["train.output_dir={tmp}/out", "train.resume=auto"]]),
    # ---------------------------------------------------------------- data
    Case("image_folder_missing", ["data.image_folder={tmp}/missing"],
         r"data\.image_folder='.*/missing' does not exist",
         [["data.image_folder={tmp}"], ["data.image_folder=https://example.com/images"], ["data.image_folder=null"]]),
    Case("image_folder_is_a_file", ["data.image_folder={tmp}/notes.txt"], r"data\.image_folder='.*' is a file",
         [["data.image_folder={tmp}"]]),
    Case("negative_num_workers", ["data.num_workers=-1"], r"data\.num_workers must be >= 0",
         [["data.num_workers=0"], ["data.num_workers=4"]]),
    # ---------------------------------------------------------------- DPO
    Case("ref_cache_of_a_reference_free_loss", ["dpo.loss_type=[simpo]", "dpo.precompute_ref_log_probs=true"],
         r"dpo\.precompute_ref_log_probs=true but dpo\.loss_type=\['simpo'\] is reference-free",
         [["dpo.loss_type=[simpo,sigmoid]", "dpo.precompute_ref_log_probs=true"], ["dpo.loss_type=[simpo]"],
          ["dpo.precompute_ref_log_probs=true"]], ("dpo",)),
    Case("ref_cache_of_orpo_and_sft", ["dpo.loss_type=[orpo,sft]", "dpo.precompute_ref_log_probs=true"],
         r"dpo\.precompute_ref_log_probs=true but .* is reference-free",
         [["dpo.loss_type=[ipo,sft]", "dpo.precompute_ref_log_probs=true"]], ("dpo",)),
    Case("nan_dpo_beta", ["dpo.beta=nan"], r"dpo\.beta must be a finite number", [["dpo.beta=0.5"]], ("dpo",)),
    # ---------------------------------------------------------------- GRPO
    Case("zero_top_p", ["grpo.top_p=0"], r"grpo\.top_p must be in \(0, 1\]", [["grpo.top_p=0.9"], ["grpo.top_p=1"]],
         ("grpo",)),
    Case("top_p_above_one", ["grpo.top_p=1.5"], r"grpo\.top_p must be in \(0, 1\]", [["grpo.top_p=0.95"]], ("grpo",)),
    Case("negative_top_k", ["grpo.top_k=-1"], r"grpo\.top_k must be >= 0", [["grpo.top_k=0"], ["grpo.top_k=50"]],
         ("grpo",)),
    Case("min_p_above_one", ["grpo.min_p=1.5"], r"grpo\.min_p must be in \[0, 1\]", [["grpo.min_p=0.05"]], ("grpo",)),
    Case("negative_min_p", ["grpo.min_p=-0.1"], r"grpo\.min_p must be in \[0, 1\]", [["grpo.min_p=0"]], ("grpo",)),
    Case("zero_repetition_penalty", ["grpo.repetition_penalty=0"], r"grpo\.repetition_penalty must be > 0",
         [["grpo.repetition_penalty=1.1"], ["grpo.repetition_penalty=0.9"]], ("grpo",)),
    Case("epsilon_high_below_epsilon", ["grpo.epsilon=0.2", "grpo.epsilon_high=0.1"],
         r"grpo\.epsilon_high=0\.1 is below grpo\.epsilon=0\.2",
         [["grpo.epsilon=0.2", "grpo.epsilon_high=0.28"], ["grpo.epsilon=0.2", "grpo.epsilon_high=0.2"],
          ["grpo.loss_type=cispo", "grpo.epsilon_high=0.1"]], ("grpo",)),  # cispo: no lower clip to compare with
    Case("inf_temperature", ["grpo.temperature=inf"], r"grpo\.temperature must be a finite number",
         [["grpo.temperature=0.7"]], ("grpo",)),
    # ---------------------------------------------------------------- CLS
    Case("metric_for_best_without_eval", ["cls.metric_for_best=macro_f1"],
         r"cls\.metric_for_best=macro_f1 picks the best evaluation, but without data\.eval_path there is none",
         [["cls.metric_for_best=macro_f1", "data.eval_path=e.json"],
          ["data.train_path=synthetic:shape_classes", "cls.metric_for_best=macro_f1"], ["cls.metric_for_best=loss"]],
         ("cls",)),
    Case("threshold_without_patience", ["cls.early_stopping_threshold=0.05"],
         r"cls\.early_stopping_threshold=0\.05 only means something with cls\.early_stopping_patience > 0",
         [["data.eval_path=e.json", "train.eval_every=5", "cls.early_stopping_patience=2",
           "cls.early_stopping_threshold=0.05"], ["cls.early_stopping_threshold=0.01"]], ("cls",)),
    Case("nan_focal_gamma", ["cls.loss_type=focal_loss", "cls.focal_gamma=nan"], r"cls\.focal_gamma must be a finite",
         [["cls.loss_type=focal_loss", "cls.focal_gamma=1.0"], ["cls.loss_type=focal_loss", "cls.focal_gamma=0"]],
         ("cls",)),
    Case("negative_focal_alpha", ["cls.loss_type=focal_loss", "cls.focal_alpha=[-1.0,1.0]"],
         r"cls\.focal_alpha\[0\] must be >= 0", [["cls.loss_type=focal_loss", "cls.focal_alpha=[0.0,1.0]"]], ("cls",)),
    Case("nan_focal_alpha", ["cls.loss_type=focal_loss", "cls.focal_alpha=[1.0,.nan]"],
         r"cls\.focal_alpha\[1\] must be a finite number", [["cls.loss_type=focal_loss", "cls.focal_alpha=[1.0,2.0]"]],
         ("cls",)),
]
MATRIX = [(case, loop) for case in CASES for loop in case.loops]


def cases_per_loop() -> dict[str, int]:
    return {loop: sum(loop in case.loops for case in CASES) for loop in LOOPS}


@pytest.fixture
def folders(tmp_path):
    """tmp_path with a complete checkpoint (out/checkpoints/step_000002), a torn one (step_000003, no marker) and
    a plain file (notes.txt)."""
    checkpoints = tmp_path / "out" / "checkpoints"
    (checkpoints / "step_000002").mkdir(parents=True)
    (checkpoints / "step_000002" / "COMPLETE").write_text("ok\n")
    (checkpoints / "step_000003").mkdir()
    (tmp_path / "notes.txt").write_text("not a folder")
    return tmp_path


def _load(loop: str, overrides: list[str], tmp):
    return load_config(LOOPS[loop], None, [*BASE[loop], *(o.replace("{tmp}", str(tmp)) for o in overrides)])


def test_the_matrix_covers_every_loop():
    assert len({case.name for case in CASES}) == len(CASES)
    counts = cases_per_loop()
    assert all(counts[loop] >= 40 for loop in LOOPS), counts
    for loop in LOOPS:  # the base configs are valid
        _load(loop, [], "/nowhere")


@pytest.mark.parametrize("case, loop", MATRIX, ids=[f"{loop}-{case.name}" for case, loop in MATRIX])
def test_a_mistake_is_one_line_naming_the_field(case, loop, folders):
    with pytest.raises(ValueError) as info:
        _load(loop, case.bad, folders)
    message = str(info.value)
    assert "\n" not in message, message
    assert re.search(case.match, message), message
    for good in case.good:
        _load(loop, good, folders)  # the valid neighbour loads


@pytest.mark.parametrize("loop", ["sft", "dpo", "grpo", "cls"])
def test_the_same_mistakes_in_a_yaml_file(loop, folders):
    """A YAML file goes through the same coercion: `.nan` / `.inf` (yaml.safe_dump writes them so), a misspelt key at
    two depths, a missing folder."""
    path = folders / "c.yaml"
    base = {"sft": {}, "dpo": {}, "grpo": {}, "cls": {"cls": {"classes": ["cat", "dog"]}}}[loop]
    for section, expected in [({"optim": {"lr": float("nan")}}, r"optim\.lr must be a finite number"),
                              ({"optim": {"betas": [0.9, float("inf")]}}, r"optim\.betas\[1\] must be a finite"),
                              ({"train": {"num_epochs": -float("inf")}}, r"train\.num_epochs must be a finite"),
                              ({"optim": {"learning_rate": 1e-5}}, r"did you mean 'optim\.lr'\?"),
                              ({"learning_rate": 1e-5}, r"did you mean 'optim\.lr'\?"),
                              ({"train": {"resume": str(folders / "gone")}}, r"train\.resume=.*no such folder")]:
        path.write_text(yaml.safe_dump({"data": {"train_path": "x.json"}, **base, **section}))
        with pytest.raises(ValueError, match=expected):
            load_config(LOOPS[loop], path)


def _float_fields(cls) -> list[tuple[str, typing.Any]]:
    """(section.field, type) of every field whose type holds a float (float, float | None, list[float], tuples)."""
    found = []
    for section, tp in typing.get_type_hints(cls).items():
        for name, hint in typing.get_type_hints(tp).items():
            args = typing.get_args(hint)
            if float in (hint, *args) or any(float in typing.get_args(a) for a in args):
                found.append((f"{section}.{name}", hint))
    return found


@pytest.mark.parametrize("loop", ["sft", "dpo", "grpo", "cls"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf"])
def test_non_finite_numbers_are_refused_in_every_float_field(loop, value):
    """No field means anything by nan or inf (grpo.reward_timeout's "no limit" is None or 0)."""
    fields = _float_fields(LOOPS[loop])
    assert {"optim.lr", "optim.betas", "data.weights", "data.fps"} <= {name for name, _ in fields}
    for name, hint in fields:
        text = value
        if typing.get_origin(hint) is tuple:
            text = f"[{value},{value}]"
        elif list in (typing.get_origin(hint), *map(typing.get_origin, typing.get_args(hint))):
            text = f"[{value}]"
        with pytest.raises(ValueError, match=rf"^{re.escape(name)}(\[0\])? must be a finite number"):
            _load(loop, [f"{name}={text}"], "/nowhere")


def test_the_upstream_names_point_at_real_fields():
    """The upstream names the suggestion knows point at real fields."""
    from vltrain.config import UPSTREAM_NAMES, _all_fields

    assert set(UPSTREAM_NAMES.values()) <= _all_fields()


def test_the_resume_marker_is_the_checkpoint_modules():
    from vltrain.checkpoint import COMPLETE
    from vltrain.config import CHECKPOINT_COMPLETE

    assert CHECKPOINT_COMPLETE == COMPLETE


def test_a_classifier_may_freeze_its_whole_backbone():
    """CLS trains its head (vltrain.classifier): everything frozen is a linear probe, not "nothing to train"."""
    cfg = _load("cls", FROZEN, "/nowhere")
    assert cfg.trainable.freeze_llm and cfg.trainable.freeze_vision_tower and cfg.trainable.freeze_merger


def test_keep_all_checkpoints_is_a_documented_limit():
    """train.save_total_limit <= 0 keeps every checkpoint (vltrain.checkpoint.save_checkpoint): allowed."""
    from vltrain.config import TrainConfig, _field_comments

    assert _load("sft", ["train.save_total_limit=0"], "/nowhere").train.save_total_limit == 0
    assert "keep every checkpoint" in _field_comments(TrainConfig)["save_total_limit"]


# ---------------------------------------------------------------------------------------------------------------
# Before any model loads

RECIPES = {"sft": ["train.resume={tmp}/nowhere"], "dpo": ["dpo.loss_type=[simpo]", "dpo.precompute_ref_log_probs=true"],
           "grpo": ["grpo.top_p=0"], "cls": ["cls.metric_for_best=macro_f1"]}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_recipes_stop_on_the_config_error_before_building(recipe, tmp_path):
    """run_recipe(setup, main): setup validates, so `main` (which opens the run and loads the model) never runs."""
    import importlib

    from vltrain.run import run_recipe

    module = importlib.import_module(f"recipes.{recipe}")
    argv = [*BASE[recipe], f"train.output_dir={tmp_path / 'out'}", *(o.replace("{tmp}", str(tmp_path))
                                                                      for o in RECIPES[recipe])]
    with pytest.raises(SystemExit) as info:
        run_recipe(module.setup, lambda cfg: pytest.fail("main ran"), argv)
    message = str(info.value.code)
    assert message.startswith("config error: ") and "\n" not in message, message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("listed", [False, True])
def test_a_missing_data_file_is_named_before_the_model_loads(listed, tmp_path, monkeypatch):
    """Data files are not config errors (configs may name files written later) but open_run checks them before
    recipes/sft.py builds the model: a single path as a data error naming the file, a listed one naming its entry."""
    import recipes.sft as sft
    from vltrain.run import run_recipe

    monkeypatch.setattr(sft, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    present = tmp_path / "present.jsonl"
    present.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                                {"from": "gpt", "value": "yo"}]}) + "\n")
    missing = tmp_path / "missing.json"
    path = f"[{present},{missing}]" if listed else str(missing)
    with pytest.raises(SystemExit) as info:
        run_recipe(sft.setup, sft.main, [f"data.train_path={path}", f"train.output_dir={tmp_path / 'out'}",
                                         "train.report_to=none", "data.num_workers=0"])
    message = str(info.value.code)
    assert "\n" not in message
    expected = f"error: data.train_path[1]: data file '{missing}' does not exist" if listed else \
        f"data error: data file '{missing}' does not exist"
    assert message == expected, message
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_the_sft_script_refuses_a_missing_resume_folder_at_once(tmp_path):
    """`python recipes/sft.py ... train.resume=<missing>` ends on one config-error line, quickly, having written
    nothing: before this check the folder was found missing only after the model had loaded."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                             {"from": "gpt", "value": "yo"}]}) + "\n")
    out, missing = tmp_path / "out", tmp_path / "run" / "checkpoints" / "step_000100"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "recipes/sft.py", "model.name_or_path=tiny:qwen2_5_vl",
                           f"data.train_path={data}", f"train.output_dir={out}", "train.report_to=none",
                           "data.num_workers=0", f"train.resume={missing}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == (f"config error: train.resume='{missing}': no such folder (give a checkpoint folder, "
                         "<train.output_dir>/checkpoints/step_N, or 'auto')"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "resolved config" not in proc.stdout and "parameters:" not in proc.stdout  # no run opened, no model
    assert not out.exists()
    assert elapsed < 120, elapsed  # imports only (a few seconds); generous for a loaded CI machine


def test_every_case_names_sections_its_loops_have():
    """Guard for the matrix: every section the cases use exists in each loop that reads it."""
    for case, loop in MATRIX:
        sections = {f.name for f in dataclasses.fields(LOOPS[loop])}
        for override in case.bad:
            head = override.split("=", 1)[0].split(".", 1)[0]
            assert head in sections or case.name == "unknown_section", (case.name, loop, head)
