"""Real weights, two frozen sources: Qwen2.5-Coder-0.5B- and 1.5B-Instruct (one tokenizer) into SmolLM2-135M-Instruct,
the frozen models in bfloat16. Skipped unless `llm-modules fetch` put the three models in the user's model cache.

In bf16 a one-token decode step and a whole-sequence forward round differently (tests/test_real_models.py), so cached
decoding is compared with the full recompute within a tolerance of bf16 rounding, not exactly.
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


def test_two_real_sources_compose_decode_with_caches_and_reload(plain_dirs, tmp_path):
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(
        [plain_dirs[name] for name in SOURCES], plain_dirs[SMALL], large_dtype=torch.bfloat16
    ).eval()
    assert [c.hidden_size for c in model.config.large_configs] == [896, 1536]
    assert all(next(source.parameters()).dtype == torch.bfloat16 for source in model.sources)
    ids = model.tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert out.sequences.shape[1] == ids.shape[1] + 5
    with torch.no_grad():  # one forward without caches over the generated sequence: by causality, each prefix's logits
        recomputed = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), recomputed, atol=5e-2, rtol=5e-2)

    model.save_pretrained(tmp_path / "combined")
    config = json.loads((tmp_path / "combined" / "config.json").read_text())
    assert config["large_model_name_or_path"] == [str(plain_dirs[name]) for name in SOURCES]
    reloaded = LLMModulesForCausalLM.from_pretrained(tmp_path / "combined", large_dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
