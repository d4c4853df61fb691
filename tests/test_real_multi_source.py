"""Real weights, two frozen sources: Qwen2.5-Coder-0.5B- and 1.5B-Instruct (one tokenizer) into SmolLM2-135M-Instruct,
the frozen models in bfloat16. Skipped unless `llm-modules fetch` put the three models in the user's model cache.

Composing, generating, saving and reloading run with the sources in bfloat16. "Cached decoding == full recompute" runs
with them in float32, as in tests/test_real_models.py: in bf16 a one-token decode step and a whole-sequence forward
round differently (here by up to ~2 on logits of the random new head), which would hide a cache bug of that size.
"""

from __future__ import annotations

import json

import pytest
import torch

from llm_modules import LLMModulesForCausalLM
from llm_modules.fetch import fetched_model

pytestmark = pytest.mark.slow

SOURCES, SMALL = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"), "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def plain_dirs():
    found = {name: fetched_model(name) for name in (*SOURCES, SMALL)}
    missing = [name for name, model in found.items() if model is None]
    if missing:
        pytest.skip(f"not fetched: {', '.join(missing)} (llm-modules fetch NAME)")
    return {name: model.plain for name, model in found.items()}


def compose(plain_dirs, large_dtype):
    torch.manual_seed(0)
    return LLMModulesForCausalLM.from_large_and_small(
        [plain_dirs[name] for name in SOURCES], plain_dirs[SMALL], large_dtype=large_dtype
    ).eval()


def test_two_real_sources_compose_generate_save_and_reload_in_bf16(plain_dirs, tmp_path):
    model = compose(plain_dirs, torch.bfloat16)
    assert [c.hidden_size for c in model.config.large_configs] == [896, 1536]
    assert all(next(source.parameters()).dtype == torch.bfloat16 for source in model.sources)
    ids = model.tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    model.save_pretrained(tmp_path / "combined")
    config = json.loads((tmp_path / "combined" / "config.json").read_text())
    assert config["large_model_name_or_path"] == [str(plain_dirs[name]) for name in SOURCES]
    reloaded = LLMModulesForCausalLM.from_pretrained(tmp_path / "combined", large_dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_two_real_sources_cached_decoding_equals_full_recompute(plain_dirs):
    model = compose(plain_dirs, torch.float32)
    ids = model.tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    with torch.no_grad():  # one forward without caches over the generated sequence: by causality, each prefix's logits
        recomputed = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    assert torch.equal(out.sequences[:, ids.shape[1]:], recomputed.argmax(-1))
    assert (torch.stack(out.logits, dim=1) - recomputed).abs().max().item() < 1e-3
