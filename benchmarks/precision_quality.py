"""What a cheaper frozen model costs in quality, on real weights and real text (docs/performance.md).

1. The frozen model alone (a plain causal LM, e.g. the packaged Qwen2.5-Coder-1.5B-Instruct) in float32, bfloat16,
   fp16 and int8 (`llm_modules.quantization`), and llama.cpp on its fetched GGUF file (gguf: Q4_K_M): next-token argmax agreement with float32 and perplexity, teacher-forced,
   on three kinds of text: README paragraphs, Stratos-style rows (the paper's layout, `data.encode_conversation`) and
   GSM8K-style problems with step-by-step answers (reasoning-gym's `gsm_symbolic` generators, Apache-2.0, read from
   its hash-checked wheel; never installed).
2. A combined model trained briefly with float32 frozen features (`llm-modules train`, through the feature cache),
   then evaluated on held-out rows with the frozen model in each precision, and with its trained parts in int8 or
   with its small model in llama.cpp (`--trained-quantization int8 / gguf`): validation loss, perplexity and argmax
   agreement with float32 (assistant tokens).

    python benchmarks/precision_quality.py --large DIR --small DIR --out DIR

Writes quality.json and quality.md (atomic) under --out. Times: about 20 minutes on 2 CPU cores for the 1.5B pair (bfloat16 forwards are slow on CPUs without AVX512-BF16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.modeling_outputs import CausalLMOutput

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("float32", "bfloat16", "fp16", "int8", "gguf")
# The combined model at evaluation: the frozen model in each precision (trained parts float32), then the trained
# parts in int8 too (`--trained-quantization`).
COMBINED_SETTINGS = {
    "float32": {"large_dtype": torch.float32},
    "bfloat16": {"large_dtype": torch.bfloat16},
    "fp16": {"large_quantization": "fp16"},
    "int8": {"large_quantization": "int8"},
    "float32, trained int8": {"large_dtype": torch.float32, "trained_quantization": "int8"},
    "int8, trained int8": {"large_quantization": "int8", "trained_quantization": "int8"},
    "gguf": {"large_quantization": "gguf"},
    "gguf, trained int8": {"large_quantization": "gguf", "trained_quantization": "int8"},
    "gguf, trained gguf": {"large_quantization": "gguf", "trained_quantization": "gguf"},
    "gguf, trained gguf-q4_0": {"large_quantization": "gguf", "trained_quantization": "gguf-q4_0"},
}
SYSTEM = "Solve the problem. Think step by step, then give the final answer."


def gsm_symbolic_problems(count: int, seed: int, cache: Path) -> list[dict]:
    """`count` problems from reasoning-gym's gsm_symbolic generators (question, answer_cot, answer), seeded: the
    library's loader (`llm_modules.compare.gsm`: the wheel pinned by sha256, read as a zip, never installed)."""
    from llm_modules.compare.gsm import gsm_symbolic_problems as draw

    return draw(count, seed, cache)


def stratos_row(problem: dict) -> dict:
    steps = problem["answer_cot"].rsplit("####", 1)[0].strip()
    answer = (
        f"<|begin_of_thought|>\n\n{steps}\n\n<|end_of_thought|>\n\n"
        f"<|begin_of_solution|>\n\nThe answer is {problem['answer']}.\n\n<|end_of_solution|>"
    )
    return {"system": SYSTEM, "conversations": [{"from": "user", "value": problem["question"]},
                                                {"from": "assistant", "value": answer}]}


def readme_paragraphs(count: int) -> list[str]:
    """Prose paragraphs of README.md, then of the docs pages (the measured table in docs/performance.md read README.md
    when it still held all of the documentation)."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    blocks = [b.strip() for page in pages for b in page.read_text().split("\n\n")]
    prose = [b for b in blocks if len(b) > 300 and not b.startswith(("|", "```", "#", "    "))]
    return prose[:count]


class LlamaCppLogits:
    """llama.cpp's own next-token logits on the GGUF file of `large` (its whole model, head included), called like a
    causal LM on one sequence: `model(ids).logits` `[1, seq, vocab]`."""

    def __init__(self, large: str):
        from llm_modules.llama_cpp_source import import_llama_cpp
        from llm_modules.sources import gguf_for_source

        self.llama = import_llama_cpp().Llama(str(gguf_for_source(large)), logits_all=True, n_ctx=1024,
                                              n_threads=torch.get_num_threads(), verbose=False)

    def __call__(self, ids: torch.Tensor) -> CausalLMOutput:
        self.llama.reset()
        self.llama.eval(ids[0].tolist())
        return CausalLMOutput(logits=torch.from_numpy(self.llama.scores[: ids.shape[1]].copy())[None])

    def eval(self) -> "LlamaCppLogits":
        return self


def frozen_model_quality(large: str, texts: dict[str, list[list[int]]], precisions: list[str]) -> dict:
    """Per precision and text kind: argmax agreement with float32 and perplexity (teacher-forced)."""
    from llm_modules.quantization import quantize_frozen_model
    from llm_modules.sources import load_causal_lm

    reference: dict[str, list[torch.Tensor]] = {}
    results = {}
    for precision in precisions:
        if precision == "gguf":
            model = LlamaCppLogits(large)
        else:
            model = load_causal_lm(large, dtype=torch.float32 if precision == "float32" else torch.bfloat16).eval()
        if precision in ("fp16", "int8"):
            quantize_frozen_model(model, precision)
        results[precision] = {}
        for kind, sequences in texts.items():
            agree = total = 0
            nll = 0.0
            argmaxes = []
            for ids in sequences:
                ids_t = torch.tensor([ids])
                with torch.inference_mode():
                    logits = model(ids_t).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, ids_t[0, 1:], reduction="sum").item()
                argmaxes.append(logits.argmax(-1))
                total += len(ids) - 1
            if precision == "float32":
                reference[kind] = argmaxes
            agree = sum(int((a == r).sum()) for a, r in zip(argmaxes, reference[kind]))
            results[precision][kind] = {"agreement": agree / total, "perplexity": math.exp(nll / total), "tokens": total}
        for kind in texts:
            r = results[precision][kind]
            r["perplexity_change"] = r["perplexity"] / results["float32"][kind]["perplexity"] - 1
        print(f"{precision}: " + ", ".join(
            f"{k} agree {v['agreement']:.3f} ppl {v['perplexity']:.3f}" for k, v in results[precision].items()), flush=True)
        del model
    return results


def combined_model_quality(large: str, small: str, train_rows: list[dict], val_rows: list[dict], work: Path,
                           steps: int, settings: list[str]) -> dict:
    """Train with float32 frozen features, then the held-out loss with the frozen model in each precision."""
    from llm_modules import LLMModulesForCausalLM
    from llm_modules.data import encode_conversation

    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    # The small model's positions kept, as `compare` trains the real pair (llama.cpp's small model needs them).
    options = work / "options.json"
    options.write_text(json.dumps({"model_options": {"small_position_embeddings": "keep"}}))
    out = work / "combined"
    start = time.perf_counter()
    subprocess.run([
        sys.executable, "-m", "llm_modules.cli", "train", "--large", large, "--small", small, "--dataset", str(data),
        "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", "4", "--val-split", "0",
        "--precision", "fp32", "--feature-cache", str(work / "features"), "--lr-bridge", "1e-3", "--lr-small", "1e-4",
        "--save-steps", str(steps), "--logging-steps", "5", "--patience", "0", "--config", str(options),
    ], check=True)
    train_s = time.perf_counter() - start
    results = {"train_rows": len(train_rows), "val_rows": len(val_rows), "steps": steps, "train_seconds": train_s}
    reference: list[torch.Tensor] = []
    for name in settings:
        options = COMBINED_SETTINGS[name]
        model = LLMModulesForCausalLM.from_pretrained(out, **options).eval()
        total, count, agree = 0.0, 0, 0
        for index, row in enumerate(val_rows):
            encoded = encode_conversation(row, model.tokenizer)
            labels = torch.tensor([encoded["labels"]])
            with torch.inference_mode():
                output = model(torch.tensor([encoded["input_ids"]]), labels=labels)
            scored = labels[0, 1:] != -100  # the assistant tokens the loss counts
            argmax = output.logits[0, :-1][scored].argmax(-1)
            if name == "float32":
                reference.append(argmax)
            agree += int((argmax == reference[index]).sum())
            n = int(scored.sum())
            total, count = total + output.loss.item() * n, count + n
        results[name] = {"val_loss": total / count, "perplexity": math.exp(total / count), "agreement": agree / count}
        print(f"combined, {name}: val loss {total / count:.4f}, agreement {agree / count:.3f}", flush=True)
        del model
    return results


def markdown(result: dict) -> str:
    lines = [] if "frozen" not in result else [
        f"Frozen model {result['large']} alone, teacher-forced ({result['machine']}):", "",
        "| frozen model | text | tokens | argmax agreement with float32 | perplexity | change |",
        "| --- | --- | ---: | ---: | ---: | ---: |"]
    for precision, kinds in result.get("frozen", {}).items():
        for kind, r in kinds.items():
            lines.append(f"| {precision} | {kind} | {r['tokens']} | {r['agreement']:.1%} | {r['perplexity']:.3f} | "
                         f"{r['perplexity_change']:+.2%} |")
    c = result.get("combined")
    if c is None:
        return "\n".join(lines) + "\n"
    lines += ["" if lines else f"({result['machine']})", f"Combined model trained {c['steps']} steps on {c['train_rows']} rows with float32 frozen features, "
              f"held-out loss on {c['val_rows']} rows (assistant tokens):", "",
              "| frozen model at evaluation (trained parts float32 unless said) | validation loss | change | perplexity "
              "| argmax agreement with float32 |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in (n for n in COMBINED_SETTINGS if n in c):
        r = c[name]
        lines.append(f"| {name} | {r['val_loss']:.4f} | {r['val_loss'] / c['float32']['val_loss'] - 1:+.2%} | "
                     f"{r['perplexity']:.3f} | {r['agreement']:.1%} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", required=True, help="the frozen model: a causal LM dir or .gguf")
    parser.add_argument("--small", required=True, help="the small model of the combined one")
    parser.add_argument("--out", required=True, help="where quality.json and quality.md go")
    parser.add_argument("--texts", type=int, default=4, help="texts of each kind")
    parser.add_argument("--max-tokens", type=int, default=160, help="tokens per text")
    parser.add_argument("--train-rows", type=int, default=48)
    parser.add_argument("--val-rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="training steps of the combined model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", nargs="+", choices=["frozen", "combined"], default=["frozen", "combined"])
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="the frozen model's precisions (float32 first: the reference); the combined model's "
                        "settings are those starting with one of them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoTokenizer

    from llm_modules.benchmarking import machine_info
    from llm_modules.data import encode_conversation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = gsm_symbolic_problems(args.texts + args.train_rows + args.val_rows, args.seed, out / "downloads")
    tokenizer = AutoTokenizer.from_pretrained(args.large)
    rows = [stratos_row(p) for p in problems]
    texts = {
        "README paragraphs": [tokenizer(t)["input_ids"][: args.max_tokens] for t in readme_paragraphs(args.texts)],
        "Stratos rows": [encode_conversation(r, tokenizer)["input_ids"][: args.max_tokens] for r in rows[: args.texts]],
        "GSM problems": [tokenizer(p["question"] + "\n" + p["answer_cot"])["input_ids"][: args.max_tokens]
                         for p in problems[: args.texts]],
    }
    machine = machine_info(torch.device("cpu"))
    result = {"large": args.large, "small": args.small, "machine": f"{machine['cpu']}, {args.threads} threads, torch "
              f"{machine['torch']}, transformers {machine['transformers']}", "seed": args.seed}
    if "frozen" in args.parts:
        result["frozen"] = frozen_model_quality(args.large, texts, ["float32", *(p for p in args.precisions if p != "float32")])
    if "combined" in args.parts:
        with tempfile.TemporaryDirectory(dir=out) as work:
            held = rows[args.texts:]
            result["combined"] = combined_model_quality(
                args.large, args.small, held[: args.train_rows], held[args.train_rows:], Path(work), args.steps,
                [n for n in COMBINED_SETTINGS if n == "float32" or n.split(",")[0] in args.precisions])
    write_atomic(out / "quality.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / "quality.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
