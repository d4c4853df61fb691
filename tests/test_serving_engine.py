"""The batching engine (llm_modules.serving.engine) on tiny fp32 models, without HTTP: batched rows give the tokens
of `generate` alone, seeds do not depend on the batch, stop strings, EOS, cancellation and the queue."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from test_cli_generate import always_answer
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_modules import LLMModulesForCausalLM
from llm_modules.serving.engine import BatchingEngine, GenerationRequest

# Short prompts with long budgets start; a long prompt joins them (the running rows get padded) and leaves first
# (its padding columns are trimmed); the rest queue behind max_batch_size and join rows of other lengths.
PROMPTS = [
    ("the cat", 24),
    ("x", 30),
    ("User: what is 3 plus 4? Assistant: dog number 7 jumps over the lazy fox and more", 4),
    ("number 12.", 6),
    ("The quick brown fox jumps over", 20),
    ("dog number 7 jumps over the lazy fox and more words here, and here", 3),
]


class Recording(BatchingEngine):
    """Records the prompts prefilled (in order, and how many at a time), the batch's (rows, length) before each join
    and the length before and after each trim."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.joins, self.trims, self.admitted, self.prefills = [], [], [], []

    def _prefill(self, admitted):
        self.admitted += [g.request.prompt_ids for g in admitted]
        self.prefills.append(len(admitted))
        super()._prefill(admitted)

    def _join(self, rows, cache, mask, tokens):
        self.joins.append((len(self._rows), 0 if self._mask is None else self._mask.shape[1], mask.shape[1]))
        super()._join(rows, cache, mask, tokens)

    def _trim(self):
        before = self._mask.shape[1]
        super()._trim()
        self.trims.append((before, self._mask.shape[1]))


def combined(large, small, **options) -> tuple[LLMModulesForCausalLM, object]:
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(large, small, cross_attention_heads=4, **options).eval()
    return model, model.tokenizer


def plain(tiny_dirs, name: str):
    return AutoModelForCausalLM.from_pretrained(tiny_dirs[name]).eval(), AutoTokenizer.from_pretrained(tiny_dirs[name])


def greedy_alone(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    inputs = torch.tensor([prompt])
    output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                            do_sample=False)
    return output[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["combined", "combined-keep-positions", "two-sources-at-depth", "llama", "gpt2"])
def test_greedy_rows_of_a_batch_are_generate_alone(kind, tiny_pair, tiny_dirs, one_thread):
    """Every part's cache, mask and positions: a combined model (zeroed or kept small-model positions; Qwen2 rotary
    + GPT-Neo local attention; two frozen sources and a depth connection) and plain causal LMs (rotary Llama,
    GPT-2's learned positions)."""
    if kind == "combined":
        model, tokenizer = combined(*tiny_pair)
    elif kind == "combined-keep-positions":
        model, tokenizer = combined(*tiny_pair, small_position_embeddings="keep")
    elif kind == "two-sources-at-depth":
        large, small = tiny_pair
        model, tokenizer = combined([large, large], small, num_depth_connections=1)
    else:
        model, tokenizer = plain(tiny_dirs, kind)
    prompts = [(tokenizer(text)["input_ids"], budget) for text, budget in PROMPTS]
    # The first two run their budgets (ignore_eos); EOS is a token the fifth answer makes on its way, so that row
    # stops there, as generate stops.
    model.generation_config.eos_token_id = None
    expected = [greedy_alone(model, ids, budget) for ids, budget in prompts]
    answer = expected[4]
    end = next(i for i in range(2, len(answer)) if answer[i] not in answer[:i])
    model.generation_config.eos_token_id = answer[end]
    expected[2:] = [greedy_alone(model, ids, budget) for ids, budget in prompts[2:]]
    assert len(expected[4]) == end + 1

    with Recording(model, tokenizer, max_batch_size=3) as engine:
        generations = [engine.submit(GenerationRequest(ids, budget, ignore_eos=True)) for ids, budget in prompts[:2]]
        for generation in generations:
            next(iter(generation))  # running: the others join them
        generations += [engine.submit(GenerationRequest(ids, budget)) for ids, budget in prompts[2:]]
        assert [g.result() for g in generations] == expected
        assert (engine.running, engine.queued) == (0, 0)
    reasons = [g.finish_reason for g in generations]
    assert reasons == ["stop" if len(e) < budget else "length" for e, (_, budget) in zip(expected, prompts)]
    assert reasons[4] == "stop"
    assert engine.admitted == [ids for ids, _ in prompts]  # first come, first served
    assert any(rows and new > old for rows, old, new in engine.joins)  # a longer prompt padded the running rows
    assert any(rows and new < old for rows, old, new in engine.joins)  # a shorter one was padded to them
    assert any(after < before for before, after in engine.trims)


def test_a_seed_gives_the_same_tokens_alone_and_in_any_batch(tiny_model, one_thread):
    tokenizer = tiny_model.tokenizer
    ids = tokenizer("the cat sat")["input_ids"]
    seeded = GenerationRequest(ids, 16, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True)
    with BatchingEngine(tiny_model, tokenizer, max_batch_size=4) as engine:
        alone = engine.submit(seeded).result()
        others = [
            GenerationRequest(tokenizer("dog number 3 jumps")["input_ids"], 20),  # greedy
            GenerationRequest(ids, 12, temperature=0.8, top_p=0.9, seed=2, ignore_eos=True),  # shares the warpers
            GenerationRequest(tokenizer("x")["input_ids"], 20, temperature=1.3, seed=3),
        ]
        generations = [engine.submit(r) for r in others[:2]] + [engine.submit(seeded)] + [engine.submit(others[2])]
        together = [g.result() for g in generations]
        other_seed = engine.submit(GenerationRequest(ids, 16, temperature=0.8, top_p=0.9, seed=2, ignore_eos=True))
        other_seed = other_seed.result()
    assert together[2] == alone and len(alone) == 16
    assert other_seed != alone and together[1] == other_seed[:12]


def test_stop_strings_eos_and_ignore_eos(tiny_pair, one_thread):
    model, tokenizer = combined(*tiny_pair)
    ids = tokenizer("the cat sat")["input_ids"]
    with BatchingEngine(model, tokenizer, max_batch_size=2) as engine:
        free = engine.submit(GenerationRequest(ids, 24, ignore_eos=True)).result()
        text = tokenizer.decode(free)
        stop = text[len(text) // 2:len(text) // 2 + 3]
        generation = engine.submit(GenerationRequest(ids, 24, stop=["never there", stop]))
        stopped = generation.result()
    assert generation.finish_reason == "stop" and stopped == free[:len(stopped)]
    assert stop in tokenizer.decode(stopped) and stop not in tokenizer.decode(stopped[:-1])  # at the first token

    always_answer(model, tokenizer.eos_token)
    with BatchingEngine(model, tokenizer) as engine:
        ended, ignored = (engine.submit(GenerationRequest(ids, 5, ignore_eos=flag)) for flag in (False, True))
        assert ended.result() == [tokenizer.eos_token_id] and ended.finish_reason == "stop"
        assert ignored.result() == [tokenizer.eos_token_id] * 5 and ignored.finish_reason == "length"
    with pytest.raises(ValueError, match="tokenizer"):
        BatchingEngine(model).submit(GenerationRequest(ids, 5, stop=["x"]))


def test_cancelling_frees_the_row_and_a_cancelled_queued_request_never_starts(tiny_model, one_thread):
    tokenizer = tiny_model.tokenizer
    ids = tokenizer("the lazy dog")["input_ids"]
    with Recording(tiny_model, tokenizer, max_batch_size=1) as engine:
        long = engine.submit(GenerationRequest(ids, 4000, ignore_eos=True))
        queued = engine.submit(GenerationRequest(tokenizer("x")["input_ids"], 4))
        first = next(iter(long))  # it runs; the other one waits for its row
        assert (engine.running, engine.queued) == (1, 1)
        queued.cancel()
        assert queued.result() == [] and queued.finish_reason == "cancelled"
        long.cancel()
        made = long.result()
        assert long.finish_reason == "cancelled" and made[:1] == first and len(made) < 4000
        after = engine.submit(GenerationRequest(ids, 3))
        assert len(after.result()) == 3  # the row was freed
        assert (engine.running, engine.queued) == (0, 0)
    assert engine.admitted == [ids, ids]  # the cancelled request was never prefilled


def test_requests_arriving_together_at_an_idle_engine_share_one_prefill(tiny_model, one_thread):
    tokenizer = tiny_model.tokenizer
    prompts = [tokenizer(f"dog number {i}")["input_ids"] for i in range(4)]
    with Recording(tiny_model, tokenizer, max_batch_size=4) as engine:
        engine._prefill_s = 1.0  # as if a prefill took a second: it waits up to 0.05 s for more requests
        generations = []
        for ids in prompts:
            generations.append(engine.submit(GenerationRequest(ids, 3)))
            time.sleep(0.005)
        assert all(len(g.result()) == 3 for g in generations)
        assert engine.prefills == [4]


def test_async_iteration_and_a_failed_step(tiny_model, one_thread):
    tokenizer = tiny_model.tokenizer
    ids = tokenizer("the cat")["input_ids"]

    class FailsOnce(BatchingEngine):
        fail = False

        def _forward(self, *args):
            if self.fail:
                self.fail = False
                raise RuntimeError("out of memory")
            return super()._forward(*args)

    async def run(engine: BatchingEngine) -> tuple[list[list[int]], list[int]]:
        generation = engine.submit(GenerationRequest(ids, 6), loop=asyncio.get_running_loop())
        pieces = [piece async for piece in generation]
        with pytest.raises(TypeError, match="async for"):
            next(iter(generation))
        return pieces, generation.token_ids

    with FailsOnce(tiny_model, tokenizer) as engine:
        pieces, token_ids = asyncio.run(run(engine))
        assert pieces == [[t] for t in token_ids] and token_ids == greedy_alone(tiny_model, ids, 6)
        engine.fail = True
        failing = engine.submit(GenerationRequest(ids, 6))
        with pytest.raises(RuntimeError, match="out of memory"):
            failing.result()
        assert failing.finish_reason == "error"
        assert engine.submit(GenerationRequest(ids, 6)).result() == token_ids  # the engine goes on


def test_logit_bias_penalties_and_logprobs_are_per_row(tiny_model, one_thread):
    """Rows beside each other differ: a biased row and a penalized one do not change the plain greedy row beside
    them; a request scoring its prompt only (max_new_tokens 0) ends after the prefill that the others continue."""
    tokenizer = tiny_model.tokenizer
    ids = tokenizer("the cat sat")["input_ids"]
    plain = greedy_alone(tiny_model, ids, 6)
    with BatchingEngine(tiny_model, tokenizer, max_batch_size=4) as engine:
        requests = [
            GenerationRequest(ids, 6, ignore_eos=True, logprobs=2),
            GenerationRequest(ids, 6, ignore_eos=True, logit_bias={plain[0]: -100.0}),
            GenerationRequest(ids, 6, ignore_eos=True, presence_penalty=2.0, frequency_penalty=2.0),
            GenerationRequest(ids, 0, prompt_logprobs=1),
        ]
        together = [engine.submit(r) for r in requests]
        results = [g.result() for g in together]
        assert engine.running == 0
    assert results[0] == plain and results[1][0] != plain[0] and len(set(results[2])) == 6
    assert results[3] == [] and together[3].finish_reason == "length"
    scored = together[3].prompt_logprobs
    assert scored[0] is None and [e.token for e in scored[1:]] == ids[1:] and len(scored[1].top) == 1
    entries = together[0].logprobs
    assert [e.token for e in entries] == plain and all(e.top[0][0] == e.token for e in entries)
    with pytest.raises(ValueError, match="at least 1"):
        engine.submit(GenerationRequest(ids, 0))
