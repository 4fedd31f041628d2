"""Helper for test_dpo.py / test_grpo.py: one 2-process CPU run of `recipes.<dpo|grpo>.main` under a backend.

    torchrun --nproc_per_node 2 tests/dist_recipe.py RECIPE BACKEND DATA.json OUT_DIR [section.field=value ...]

BACKEND is ddp | zero3, picked through accelerate's environment variables as tests/dist_backends.py does
(fp32, no mixed precision). Rank 0 writes OUT_DIR/summary.json (the recipe's) and every rank OUT_DIR/rank{r}.json
with the type of its reference model, its losses and (GRPO) its logged step metrics.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_backends import BACKEND_ENV  # noqa: E402


def run(recipe_name: str, backend: str, data: str, out: str, overrides: list[str]) -> None:
    import os

    os.environ.update(BACKEND_ENV[backend])
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    if backend.startswith("zero"):
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see dist_backends.py
    import importlib

    recipe = importlib.import_module(f"recipes.{recipe_name}")
    tests = importlib.import_module(f"test_{recipe_name}")
    make_config = getattr(tests, f"{recipe_name}_config")

    captured = {}
    real_train = recipe.train

    def train_and_capture(accelerator, *args, **kwargs):
        result = real_train(accelerator, *args, **kwargs)
        reference = getattr(result, "reference", None)
        captured.update(rank=accelerator.process_index,
                        reference=type(reference.module).__name__ if reference is not None else None,
                        model=type(result.model).__name__, losses=result.losses,
                        metrics=getattr(result, "metrics", None))
        return result

    recipe.train = train_and_capture
    cfg = make_config(Path(out).parent, Path(data), **dict(o.split("=", 1) for o in overrides))
    cfg.train.output_dir = out
    recipe.main(cfg)
    Path(out, f"rank{captured['rank']}.json").write_text(json.dumps(captured, indent=1))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
