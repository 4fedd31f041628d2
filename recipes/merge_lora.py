"""Merge a LoRA/DoRA adapter folder into its base model and save a plain transformers model.

    python recipes/merge_lora.py outputs/sft/final/adapter [--base Qwen/Qwen2.5-VL-3B-Instruct] \
        [--out outputs/sft/final/merged] [--dtype bfloat16]

The base defaults to the adapter's `base_model_name_or_path`, the dtype to the training dtype recorded
in `vltrain_config.yaml` next to the adapter; the base is loaded unquantized (a QLoRA adapter merges
into full-precision weights). Every adapter key must match a parameter of the base and vice versa:
a mismatch is an error naming the key, never silently dropped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vltrain.cli import program


def main(argv: list[str]) -> Path:
    from vltrain.lora import merge_adapter

    parser = argparse.ArgumentParser(prog=program("python recipes/merge_lora.py"), description=__doc__.split("\n")[0])
    parser.add_argument("adapter_dir")
    parser.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--out", default=None, help="output folder (default: ADAPTER_DIR/../merged)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    adapter_dir = Path(args.adapter_dir)
    out = Path(args.out) if args.out else adapter_dir.parent / "merged"
    model, processor = merge_adapter(adapter_dir, base=args.base, dtype=args.dtype)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    print(f"merged {adapter_dir} into {args.base or 'its base'} -> {out}")
    return out


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"merge error: {e}")
