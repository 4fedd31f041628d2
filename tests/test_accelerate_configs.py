import json

import pytest
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


def test_zero3_offload_uses_deepspeed_cpu_adam_with_our_groups():
    from vltrain.config import OptimConfig
    from vltrain.optim import build_optimizer
    from vltrain.tiny import build_tiny

    pytest.importorskip("deepspeed")
    model, _ = build_tiny("qwen2_vl")
    try:
        optimizer = build_optimizer(model, OptimConfig(lr=1e-4, vision_lr=1e-5), cpu_offload=True)
    except Exception as e:  # the CPU Adam op is JIT-built; without a compiler it cannot exist
        pytest.skip(f"DeepSpeedCPUAdam unavailable here: {e}")
    assert type(optimizer).__name__ == "DeepSpeedCPUAdam"
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["vision"] == 1e-5
