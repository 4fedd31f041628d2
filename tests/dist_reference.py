"""Helper for test_build.py: the frozen-copy reference on 2 CPU processes under a chosen backend.

    torchrun --nproc_per_node 2 tests/dist_reference.py BACKEND MODEL_DIR DATA.json OUT_DIR

BACKEND is ddp | zero2 | zero3 | fsdp2 (fsdp2 needs CUDA: accelerate runs it as DDP on CPU) (selected through accelerate's environment variables, as tests/dist_backends.py
does). Each rank: builds the policy, copies the reference before `accelerator.prepare`, prepares both, trains
the policy 2 steps on its own sample, and writes OUT_DIR/rank{r}.json: whether the reference matched the
starting policy, stayed unchanged while the policy moved, and whether its weights are partitioned.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(backend: str, model_dir: str, data: str, out: str) -> None:
    from dist_backends import BACKEND_ENV

    os.environ.update(BACKEND_ENV[backend])
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    from torch.utils.data import DataLoader

    from conftest import sft_config
    from vltrain.build import build_model, build_reference
    from vltrain.data.dataset import PadCollator, SFTDataset
    from vltrain.data.media import MediaOptions
    from vltrain.distributed import build_accelerator, fill_deepspeed_auto
    from vltrain.optim import build_optimizer
    from vltrain.progress import model_inputs

    cfg = sft_config(Path(out), "qwen2_5_vl", data, **{"model.name_or_path": model_dir, "optim.lr": 1e-2,
                                                       "train.micro_batch_size": 1})
    accelerator = build_accelerator(cfg.train)
    built = build_model(cfg.model, cfg.trainable, cfg.lora, lora_reference=True)
    reference = build_reference(built.model, cfg.model)
    optimizer = build_optimizer(built.model, cfg.optim)
    fill_deepspeed_auto(accelerator, built.model, cfg.optim.max_grad_norm)
    media = MediaOptions(image_factor=28, image_max_pixels=64 * 64 * 2, video_max_pixels=64 * 64, nframes=4)
    dataset = SFTDataset(data, built.processor, media, max_seq_length=1024, image_folder=str(Path(data).parent))
    collate = PadCollator(built.processor.tokenizer.pad_token_id)
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(built.model, optimizer, loader)
    reference.prepare(accelerator, model)
    # before any forward (FSDP2 keeps some modules unsharded after one): ZeRO-3 manages every parameter (tiny
    # ones stay resident, below the persistence threshold); FSDP2 makes every parameter a sharded DTensor
    from torch.distributed.tensor import DTensor

    partitioned = all(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in reference.module.parameters())
    rank = accelerator.process_index
    batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in collate([dataset[1 + rank]]).items()}

    def logits(m):
        with torch.no_grad():
            return m(**model_inputs(batch, labels=False)).logits.float()

    model.eval()
    start = logits(model)
    with reference() as ref:
        ref_start = logits(ref)
    model.train()
    for _ in range(2):
        accelerator.backward(model(**model_inputs(batch)).loss)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    moved = float((logits(model) - start).abs().max())
    with reference() as ref:
        ref_after = logits(ref)
    frozen_params = list(reference.module.parameters())
    record = {
        "rank": rank, "world": accelerator.num_processes,
        "ref_matches_start": float((ref_start - start).abs().max()),
        "ref_changed": float((ref_after - ref_start).abs().max()),
        "policy_moved": moved,
        "ref_trainable": sum(p.requires_grad for p in frozen_params),
        "ref_partitioned": partitioned,
        "ref_wrapper": type(reference.module).__name__,
        "models_registered": len(accelerator._models),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    accelerator.end_training()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(*sys.argv[1:5])
