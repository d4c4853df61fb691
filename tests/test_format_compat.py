"""Models saved by older versions keep loading: tests/fixtures/combined_v0 was written by the format-0 code (one
source, an input bridge, no `format_version` in its config) by tests/fixtures/make_combined_v0.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from llm_modules import LLMModulesForCausalLM

FIXTURE = Path(__file__).parent / "fixtures" / "combined_v0"


def test_format_0_model_loads_with_identical_logits(one_thread):
    assert "format_version" not in json.loads((FIXTURE / "combined" / "config.json").read_text())
    expected = load_file(str(FIXTURE / "logits.safetensors"))
    model = LLMModulesForCausalLM.from_pretrained(FIXTURE / "combined", large_model_name_or_path=FIXTURE / "large")
    assert model.config.format_version == 0
    with torch.no_grad():
        logits = model(expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=0)


def test_public_names_stay_importable_from_modeling():
    from llm_modules import bridge, cache, modeling

    assert modeling.EnhancedCrossAttention is bridge.EnhancedCrossAttention
    assert modeling.LLMModulesBridge is bridge.LLMModulesBridge
    assert modeling.LLMModulesCache is cache.LLMModulesCache
    assert modeling.cross_attention_mask is bridge.cross_attention_mask
