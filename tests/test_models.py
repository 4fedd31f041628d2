import json

import pytest
import torch

from vltrain.config import ModelConfig
from vltrain.families import FAMILIES, family_spec
from vltrain.models import load_model, resolve_attn_implementation
from vltrain.tiny import build_tiny


def test_load_model_from_a_local_folder_in_the_chosen_dtype(tmp_path):
    model, processor = build_tiny("qwen3_vl")
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    loaded, loaded_processor = load_model(ModelConfig(name_or_path=str(tmp_path / "m"), dtype="bfloat16",
                                                      attn_implementation="sdpa"))
    assert loaded.dtype == torch.bfloat16 and loaded.config.model_type == "qwen3_vl"
    assert loaded.config._attn_implementation == "sdpa"
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert loaded_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_unsupported_family_is_a_clear_error(tmp_path):
    model, _ = build_tiny("qwen2_vl")
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "llava"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a supported Qwen-VL family"):
        family_spec(type("C", (), {"model_type": "llava"})())
    with pytest.raises(ValueError):
        load_model(ModelConfig(name_or_path=str(tmp_path / "m")))


def test_attention_choice():
    assert resolve_attn_implementation("sdpa") == "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert resolve_attn_implementation("auto") == "sdpa"
        with pytest.raises(ValueError, match="flash-attn is not installed"):
            resolve_attn_implementation("flash_attention_2")


def test_family_table_is_keyed_by_model_type_and_matches_the_models():
    for model_type, spec in FAMILIES.items():
        model, _ = build_tiny(model_type)
        assert family_spec(model) is spec
        modules = dict(model.named_modules())
        for path in (spec.vision_module, spec.vision_blocks, spec.llm_module, spec.llm_layers, spec.lm_head,
                     *spec.merger_modules):
            assert path in modules, (model_type, path)
        assert model.config.vision_config.patch_size == spec.patch_size


@pytest.mark.parametrize("hopper,triton_ok,tilelang,refused", [
    (True, False, False, True), (True, True, False, False), (True, False, True, False), (False, False, False, False)])
def test_qwen3_5_refused_early_where_fla_cannot_train(monkeypatch, hopper, triton_ok, tilelang, refused):
    """flash-linear-attention installed + Hopper + Triton 3.4-3.7.0 without tilelang: a clear error before the
    model loads (fla itself would raise at the first backward). Other families never look."""
    import importlib.util
    import sys
    import types

    from vltrain.models import check_linear_attention_backend

    fake = types.ModuleType("fla.utils")
    fake.IS_NVIDIA_HOPPER, fake.TRITON_ABOVE_3_4_0, fake.TRITON_ABOVE_3_7_1 = hopper, True, triton_ok
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setitem(sys.modules, "fla.utils", fake)
    real_find_spec = importlib.util.find_spec
    installed = {"fla": True, "tilelang": tilelang}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if installed.get(name) else None if name in installed
                        else real_find_spec(name, *a))
    check_linear_attention_backend("qwen2_5_vl")  # no linear attention: never refused
    if refused:
        with pytest.raises(ValueError, match="qwen3_5: flash-linear-attention is installed.*Triton"):
            check_linear_attention_backend("qwen3_5")
        with pytest.raises(ValueError, match="flash-linear-attention"):
            load_model(ModelConfig(name_or_path="tiny:qwen3_5_moe"))
    else:
        check_linear_attention_backend("qwen3_5")
