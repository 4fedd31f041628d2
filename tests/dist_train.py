"""Helper for test_sft.py: trains on 2 CPU processes and writes each rank's weight checksum.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_train.py DATA.json OUT_DIR [section.field=value ...]
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import sft_config  # noqa: E402
from recipes.sft import main  # noqa: E402


def run(data: str, out: str, overrides: list[str]) -> None:
    import loops.sft as sft

    captured = {}
    real_train = sft.train

    def train_and_capture(accelerator, model, *args, **kwargs):
        result = real_train(accelerator, model, *args, **kwargs)
        params = accelerator.unwrap_model(model).state_dict()
        checksum = sum(float(v.double().sum()) * (i + 1) for i, v in enumerate(params.values()))
        captured.update(rank=accelerator.process_index, world_size=accelerator.num_processes,
                        checksum=round(checksum, 6), losses=result.losses)
        return result

    import recipes.sft as recipe

    recipe.train = train_and_capture
    cfg = sft_config(Path(out).parent, "qwen2_5_vl", data, **{"train.max_steps": 4, "train.micro_batch_size": 1,
                                                               "train.gradient_accumulation_steps": 2,
                                                               **dict(o.split("=", 1) for o in overrides)})
    cfg.train.output_dir = out
    main(cfg)
    Path(out, f"rank{captured['rank']}.json").write_text(json.dumps(captured))


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], sys.argv[2], sys.argv[3:])
