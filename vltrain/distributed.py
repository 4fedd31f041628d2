"""The few places where the distributed backend matters, one function each (loops never branch on it)."""

from __future__ import annotations

import os

import torch


def accelerator_device_kwargs() -> dict:
    """Device arguments for `Accelerator(...)`. Without CUDA, `cpu=True` so a 2-process CPU launch really
    runs 2 gloo ranks -- except under a DeepSpeed launch: accelerate turns `cpu=True` into plain DDP
    (silently), and with `cpu=False` and no CUDA it finds no backend and gives every rank
    num_processes=1, process_index=0 (unsharded data, every rank "main"). Naming gloo fixes both."""
    if torch.cuda.is_available():
        return {"cpu": False}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from accelerate.utils import InitProcessGroupKwargs

        return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def deepspeed_offloads_optimizer(accelerator) -> bool:
    """True under DeepSpeed with `offload_optimizer` on: the optimizer must then be DeepSpeed's CPU Adam."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return False
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def parameters_sharded(accelerator) -> bool:
    """True under ZeRO-3 or FSDP: no single rank holds the full weights (generation needs all ranks)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        return True
    return getattr(accelerator.state, "fsdp_plugin", None) is not None


def fill_deepspeed_auto(accelerator, model, max_grad_norm: float) -> None:
    """Fill the DeepSpeed `auto` entries accelerate would get wrong for us: the hidden-size-based ones
    (bucket sizes, ZeRO-3 persistence threshold) from the language model's hidden size -- accelerate looks
    for `model.config.hidden_size`, which a Qwen-VL config keeps in `text_config`, and otherwise refuses
    to prepare -- and `gradient_clipping` from `optim.max_grad_norm` (accelerate fills in 1.0, and under
    DeepSpeed `accelerator.clip_grad_norm_` only reports the norm: the engine clips)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = float(max_grad_norm or 0.0)
    elif float(ds["gradient_clipping"]) != float(max_grad_norm or 0.0):
        raise ValueError(f"the DeepSpeed config's gradient_clipping={ds['gradient_clipping']} contradicts "
                         f"optim.max_grad_norm={max_grad_norm}: set it to \"auto\"")
    config = getattr(model, "config", None)
    if config is None or hasattr(config, "hidden_size") or hasattr(config, "hidden_sizes"):
        return  # accelerate fills them itself
    hidden = config.get_text_config().hidden_size
    zero = ds.get("zero_optimization", {})
    values = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
              "stage3_param_persistence_threshold": 10 * hidden}
    for key, value in values.items():
        if zero.get(key) == "auto":
            zero[key] = value


def build_accelerator(train_cfg):
    """The Accelerator every recipe uses: accumulation counted by us (not by the dataloader), seedable
    samplers (resume-exact shuffling), trackers from `train.report_to`, logs under `train.output_dir`."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    return Accelerator(
        **accelerator_device_kwargs(),  # CPU gloo runs (plain and DeepSpeed) need it said explicitly
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=train_cfg.gradient_accumulation_steps, sync_with_dataloader=False),
        # non_blocking: batches pinned by the loader (data.pin_memory) reach the GPU without a stream sync
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        log_with=None if train_cfg.report_to == "none" else train_cfg.report_to,
        project_dir=train_cfg.output_dir,
    )


def prepare_frozen_model(accelerator, model):
    """Place a frozen model (a DPO / GRPO reference) the way the policy is placed, without making it part of
    the training state. Call it after `accelerator.prepare(policy, ...)` (DeepSpeed's `auto` values are then
    resolved).
    - DeepSpeed: its own inference engine from the policy's config without optimizer -- ZeRO-3 keeps it sharded
      like the policy (parameter offload included); under ZeRO-0/1/2 the weights are whole on every rank.
    - FSDP2: sharded by accelerate's own FSDP2 wrapping (the policy's auto-wrap policy and mixed precision).
    - otherwise: moved to the device, with the policy's autocast; no DDP wrapper (nothing to all-reduce).
    It is never registered with the accelerator, so `save_state` / `load_state` never see it."""
    import copy

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        import deepspeed

        config = copy.deepcopy(plugin.deepspeed_config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        zero = config.setdefault("zero_optimization", {})
        if zero.get("stage") != 3:
            config["zero_optimization"] = {"stage": 0}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        model = fsdp2_prepare_model(accelerator, model)
        model.eval()
        return model
    model = accelerator.prepare_model(model, evaluation_mode=True)
    if model in accelerator._models:
        accelerator._models.remove(model)  # checkpoints hold the policy only
    return model


def sum_over_ranks(accelerator, count: int) -> int:
    """`count` summed over every rank (a collective)."""
    return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum"))


def gather_lists(accelerator, items: list) -> list:
    """Every rank's `items` (picklable), concatenated in rank order on every rank (a collective)."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def check_kernels_supported(accelerator, model_cfg) -> None:
    """Refuse kernel choices the launch config cannot run (ValueError naming the field): before the model loads."""
    from vltrain.kernels.float8 import FLOAT8_RECIPES, check_float8_supported

    for name in FLOAT8_RECIPES:
        if name in model_cfg.kernels:
            check_float8_supported(name, accelerator.device)  # torchao installed, a GPU with fp8 matmuls
            if parameters_sharded(accelerator):
                raise ValueError(f"model.kernels {name} is not supported under ZeRO-3/FSDP sharding (untested "
                                 "there): drop it from model.kernels")
    for name in ("compile_layers", "compile_vision"):
        if name in model_cfg.kernels and parameters_sharded(accelerator):
            raise ValueError(f"model.kernels {name} is not supported under ZeRO-3/FSDP sharding (untested there): "
                             "drop it from model.kernels")
