"""The shipped accelerate configs load, and what zero3_offload changes in our code (the optimizer choice)."""

import inspect
import json
import types
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO

CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


def test_all_backends_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert names == {"single_gpu", "ddp", "fsdp2", "zero2", "zero3", "zero3_offload"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    raw = yaml.safe_load(path.read_text())
    config = load_config_from_file(str(path))
    assert "accelerate launch --config_file accelerate_configs/" in path.read_text()
    if config.distributed_type == "DEEPSPEED":
        ds = REPO / raw["deepspeed_config"]["deepspeed_config_file"]
        spec = json.loads(ds.read_text())
        assert "optimizer" not in spec and "scheduler" not in spec, "the optimizer and its groups are vltrain's"
        assert spec["gradient_accumulation_steps"] == "auto" and spec["gradient_clipping"] == "auto"
        assert spec["zero_optimization"]["stage"] == (2 if path.stem == "zero2" else 3)
    if path.stem == "fsdp2":
        assert raw["fsdp_config"]["fsdp_version"] == 2


def _fake_accelerator(ds_json: str):
    """What `deepspeed_offloads_optimizer` reads of an Accelerator launched with this DeepSpeed JSON."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(REPO / "accelerate_configs" / ds_json))
    return types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin))


def test_only_the_offload_config_asks_for_the_cpu_optimizer():
    from vltrain.distributed import deepspeed_offloads_optimizer

    pytest.importorskip("deepspeed")
    offloads = {name: deepspeed_offloads_optimizer(_fake_accelerator(f"{name}.json"))
                for name in ("zero2", "zero3", "zero3_offload")}
    assert offloads == {"zero2": False, "zero3": False, "zero3_offload": True}
    assert not deepspeed_offloads_optimizer(types.SimpleNamespace(state=types.SimpleNamespace()))  # DDP / FSDP


def test_cpu_offload_builds_deepspeed_cpu_adam_with_our_groups(monkeypatch):
    """What zero3_offload changes in our code: `build_optimizer(cpu_offload=True)` hands our named groups
    to DeepSpeedCPUAdam (adamw mode, our betas / eps), in a call the real class's signature accepts. The
    class is replaced by a recorder, because constructing the real one JIT-compiles its C++ op (~3 min
    on the 2-core CI machine, every run): whether the compiled op steps is left to
    `test_real_deepspeed_cpu_adam_steps_our_groups`, which runs only where the op is already built."""
    import deepspeed.ops.adam
    from vltrain.config import OptimConfig
    from vltrain.optim import build_optimizer
    from vltrain.tiny import build_tiny

    real = deepspeed.ops.adam.DeepSpeedCPUAdam
    calls = []

    class RecordingCPUAdam(torch.optim.Optimizer):
        def __init__(self, *args, **kwargs):
            calls.append(inspect.signature(real.__init__).bind(self, *args, **kwargs))
            super().__init__(args[0], {"lr": kwargs.get("lr", 1e-3)})

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", RecordingCPUAdam)
    model, _ = build_tiny("qwen2_vl")
    cfg = OptimConfig(lr=1e-4, vision_lr=1e-5, betas=(0.8, 0.95), eps=1e-7)
    optimizer = build_optimizer(model, cfg, cpu_offload=True)
    assert type(optimizer) is RecordingCPUAdam and len(calls) == 1
    args = calls[0].arguments
    assert args["adamw_mode"] is True and tuple(args["betas"]) == (0.8, 0.95) and args["eps"] == 1e-7
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["vision"]["lr"] == 1e-5 and groups["llm"]["lr"] == 1e-4
    assert {id(p) for g in groups.values() for p in g["params"]} == \
        {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="optim.optimizer=adamw_8bit"):
        build_optimizer(model, OptimConfig(optimizer="adamw_8bit"), cpu_offload=True)
    assert type(build_optimizer(model, cfg)) is torch.optim.AdamW and len(calls) == 1  # no offload: torch's


def _cpu_adam_is_built() -> bool:
    """DeepSpeed's CPU Adam op loads without compiling: installed prebuilt, or already in the JIT cache."""
    import deepspeed.git_version_info
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from torch.utils.cpp_extension import _get_build_directory

    name = CPUAdamBuilder.NAME
    return bool(deepspeed.git_version_info.installed_ops.get(name)) or \
        Path(_get_build_directory(name, verbose=False), f"{name}.so").is_file()


def test_real_deepspeed_cpu_adam_steps_our_groups():
    pytest.importorskip("deepspeed")
    if not _cpu_adam_is_built():
        pytest.skip("DeepSpeed's CPU Adam op is not built here; building it takes ~3 min (not done in CI)")
    from vltrain.config import OptimConfig
    from vltrain.optim import build_optimizer
    from vltrain.tiny import build_tiny

    model, _ = build_tiny("qwen2_vl")
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, vision_lr=1e-5), cpu_offload=True)
    assert type(optimizer).__name__ == "DeepSpeedCPUAdam"
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["vision"] == 1e-5
    before = {g["name"]: [p.detach().clone() for p in g["params"]] for g in optimizer.param_groups}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    moved = {g["name"]: max((p.detach() - b).abs().max().item() for p, b in zip(g["params"], before[g["name"]]))
             for g in optimizer.param_groups}
    # Adam's first step moves every weight by its group's lr (weight decay adds at most lr * wd * |w|)
    for name, lr in (("llm_no_decay", 1e-4), ("vision_no_decay", 1e-5)):
        assert moved[name] == pytest.approx(lr, rel=2e-2), (name, moved)  # fp32 rounding of w
    for name, lr in (("llm", 1e-4), ("vision", 1e-5)):
        assert lr * 0.99 <= moved[name] <= 1.5 * lr, (name, moved)
