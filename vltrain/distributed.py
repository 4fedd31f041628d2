"""The few places where the distributed backend matters, one function each (loops never branch on it)."""

from __future__ import annotations


def deepspeed_offloads_optimizer(accelerator) -> bool:
    """True under DeepSpeed with `offload_optimizer` on: the optimizer must then be DeepSpeed's CPU Adam."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return False
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
