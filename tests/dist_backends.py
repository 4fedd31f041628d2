"""Helper for test_distributed.py: one 2-process CPU run of `recipes.sft.main` under a chosen backend.

    torchrun --nproc_per_node 2 tests/dist_backends.py BACKEND DATA.json OUT_DIR [section.field=value ...]

BACKEND is ddp | zero2 | zero3 | fsdp2. The backend is picked the way `accelerate launch --config_file
accelerate_configs/<backend>.yaml` picks it -- through accelerate's environment variables, read by the
recipe's own `Accelerator(...)` -- because `accelerate launch --use_deepspeed` does not start on CPU.
Mixed precision is off (fp32): CPU gloo has no bf16 collectives worth testing.

The train loader is rebuilt unshuffled, so with micro-batch 1 rank r gets samples r, r+2, r+4, ...
(accelerate deals whole batches round-robin): a dataset alternating text-only / media samples puts only
text-only batches on rank 0 and only image/video batches on rank 1 in every micro-step.

Each rank writes OUT_DIR/rank{r}.json: losses and grad norms per step, whether each of its micro-batches
had media, the optimizer's group lrs read after `prepare`, the largest weight change per component
(llm / vision / merger), the loss of the trained model on a fixed batch, and a weight checksum. Rank 0
also writes OUT_DIR/fixed_batch.pt (that batch) for the single-process export check.
"""

import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO))

BACKEND_ENV = {
    "ddp": {},
    "zero2": {"ACCELERATE_USE_DEEPSPEED": "true",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "accelerate_configs" / "zero2.json"),
              "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"},
    "zero3": {"ACCELERATE_USE_DEEPSPEED": "true",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "accelerate_configs" / "zero3.json"),
              "ACCELERATE_DEEPSPEED_ZERO3_INIT": os.environ.get("VLTRAIN_TEST_ZERO3_INIT", "false")},
    # accelerate_configs/fsdp2.yaml as accelerate launch would export it
    "fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
              "FSDP_CPU_RAM_EFFICIENT_LOADING": "false", "FSDP_OFFLOAD_PARAMS": "false",
              "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
              "FSDP_ACTIVATION_CHECKPOINTING": "false"},
}


def run(backend: str, data: str, out: str, overrides: list[str]) -> None:
    os.environ.update(BACKEND_ENV[backend])
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    if backend.startswith("zero"):
        import deepspeed.ops

        # DeepSpeed JIT-builds its shared-memory comm op (~1-2 min on 2 cores, both ranks racing) for
        # inference_all_reduce only; ZeRO training never uses it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    import vltrain.training as common
    import loops.sft as loop
    from vltrain.vision import batch_has_media
    import recipes.sft as recipe
    from conftest import sft_config
    from vltrain.families import family_spec
    from vltrain.trainable import param_component

    captured = {"has_media": [], "grad_norms": []}
    ctx = {}

    def build_loader_unshuffled(*args, **kwargs):
        return real_build_loader(*args, **{**kwargs, "shuffle": False})

    def sft_loss_recording(model, batch, num_tokens):
        if not ctx.get("done"):
            captured["has_media"].append(batch_has_media(batch))
        return real_sft_loss(model, batch, num_tokens)

    def build_scheduler_after_prepare(optimizer, *args, **kwargs):
        # called by the loop right after accelerator.prepare: what the prepared optimizer really holds
        accelerator = ctx["accelerator"]
        captured["group_lrs"] = {g.get("name", "?"): g["lr"] for g in optimizer.param_groups}
        captured["optimizer_type"] = type(getattr(optimizer, "optimizer", optimizer)).__name__
        captured["distributed_type"] = str(accelerator.distributed_type)
        ctx["initial"] = _full_state(accelerator)
        return real_build_scheduler(optimizer, *args, **kwargs)

    def measure(accelerator, train_loader):
        prepared = accelerator._models[0]
        ds, collate = train_loader.dataset, train_loader.collate_fn
        batch = collate([ds[0], ds[1]])  # the first two samples, padded
        prepared.eval()
        with torch.no_grad():
            fixed_loss = float(loop.sft_loss(prepared, dict(batch), loop.count_label_tokens(batch)))
        final = _full_state(accelerator)
        spec = family_spec(accelerator.unwrap_model(prepared))
        if accelerator.is_main_process:
            torch.save(batch, Path(out) / "fixed_batch.pt")
            change = {}
            for name, before in ctx["initial"].items():
                delta = float((final[name].float() - before.float()).abs().max())
                component = param_component(name, spec)
                change[component] = max(change.get(component, 0.0), delta)
            captured["max_change"] = change
        local = accelerator.unwrap_model(prepared).state_dict()  # this rank's copy (a shard under ZeRO-3)
        captured.update(
            rank=accelerator.process_index, world_size=accelerator.num_processes, fixed_loss=fixed_loss,
            checksum=round(sum(float(v.double().sum()) * (i + 1) for i, v in enumerate(local.values())), 6),
        )

    def train_and_capture(accelerator, model, train_loader, *args, **kwargs):
        ctx["accelerator"] = accelerator
        result = real_train(accelerator, model, train_loader, *args, **kwargs)
        ctx["done"] = True
        measure(accelerator, train_loader)  # the caller ends the process group, after this
        captured.update(losses=result.losses, step=result.step)
        return result

    def optimizer_step_recording(*a, **k):  # the norm each step measured (DeepSpeed: the engine's, read back)
        grad_norm, stepped = real_optimizer_step(*a, **k)
        captured["grad_norms"].append(float(grad_norm) if grad_norm is not None else None)
        return grad_norm, stepped

    real_build_loader, real_sft_loss, real_train = recipe.build_loader, loop.sft_loss, recipe.train
    real_optimizer_step = common.optimizer_step
    common.optimizer_step = optimizer_step_recording
    real_build_scheduler = common.build_scheduler  # the loops' shared prepare_run builds the scheduler
    recipe.build_loader, recipe.train = build_loader_unshuffled, train_and_capture
    loop.sft_loss, common.build_scheduler = sft_loss_recording, build_scheduler_after_prepare

    cfg = sft_config(Path(out).parent, "qwen2_5_vl", data, **{
        "train.max_steps": 4, "train.micro_batch_size": 1, "train.gradient_accumulation_steps": 2,
        "optim.lr": 3e-3, "optim.vision_lr": 1e-5, "optim.merger_lr": 1e-4, "optim.max_grad_norm": 0,
        **dict(o.split("=", 1) for o in overrides)})
    cfg.train.output_dir = out
    recipe.main(cfg)
    Path(out, f"rank{captured['rank']}.json").write_text(json.dumps(captured, indent=1))


def _full_state(accelerator) -> dict:
    """Full fp32 copy of every parameter on the main process (gathered under ZeRO-3 / FSDP)."""
    state = accelerator.get_state_dict(accelerator._models[0])
    return {k: v.detach().float().clone() for k, v in state.items()} if accelerator.is_main_process else {}


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
