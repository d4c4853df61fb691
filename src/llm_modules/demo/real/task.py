"""The real-weights demo's task: seeded arithmetic questions with exact answers, as Bespoke-Stratos rows.

Each task draws operand pairs from a seed (`make_split`): train and held-out questions share no question, with the
operands of `+` and `*` compared unordered (`347 + 589` and `589 + 347` are one question). A row is
`{"system", "conversations": [user, assistant]}` as `llm_modules.data` reads it; the assistant turn restates the
sum in the thought (`347 + 589 = 936`), so the answer is written once where the question was read and copied into
the solution. The same rows train every system; the untrained systems are asked in their own chat template
(`native_messages`) and scored on the first number of their reply (`first_number`).
"""

from __future__ import annotations

import random
import re
from itertools import product
from collections.abc import Callable
from dataclasses import dataclass

from ...data import ANSWER_MARKERS

BEGIN_THOUGHT, END_THOUGHT, BEGIN_SOLUTION, END_SOLUTION = ANSWER_MARKERS
# Short on purpose: every token of a row costs a forward pass of the 1.5B frozen model in the feature cache, and the
# format is learned from the rows themselves (the Stratos instruction would add ~200 tokens to every row).
SYSTEM_PROMPT = "Solve the arithmetic problem."
NATIVE_INSTRUCTION = "Answer with just the number."


@dataclass(frozen=True)
class TaskSpec:
    """One kind of question: operand ranges (inclusive) and the operator."""

    symbol: str  # as written in the question: "+", "-", "*"
    a_range: tuple[int, int]
    b_range: tuple[int, int]
    description: str

    def apply(self, a: int, b: int) -> int:
        return OPERATIONS[self.symbol](a, b)


OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}
COMMUTATIVE = {"+", "*"}

# The candidates of issue 12. Subtraction draws a >= b, so answers are never negative (0-899).
TASKS: dict[str, TaskSpec] = {
    "add3": TaskSpec("+", (100, 999), (100, 999), "3-digit + 3-digit"),
    "mul2x1": TaskSpec("*", (10, 99), (2, 9), "2-digit x 1-digit"),
    "mul2x2": TaskSpec("*", (10, 99), (10, 99), "2-digit x 2-digit"),
    "sub3": TaskSpec("-", (100, 999), (100, 999), "3-digit - 3-digit"),
}


@dataclass(frozen=True)
class Problem:
    task: str
    a: int
    b: int

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]

    @property
    def expression(self) -> str:
        """`347 + 589`."""
        return f"{self.a} {self.spec.symbol} {self.b}"

    @property
    def question(self) -> str:
        return f"What is {self.expression}?"

    @property
    def answer(self) -> int:
        return self.spec.apply(self.a, self.b)

    @property
    def key(self) -> tuple:
        """Identity of the question: operands unordered for `+` and `*`."""
        operands = tuple(sorted((self.a, self.b))) if self.spec.symbol in COMMUTATIVE else (self.a, self.b)
        return (self.task, *operands)


def question_space(task: str) -> int:
    """How many distinct questions `task` has (exact for the small tasks, a lower bound for the large ones)."""
    spec = TASKS[task]
    a_values, b_values = range(spec.a_range[0], spec.a_range[1] + 1), range(spec.b_range[0], spec.b_range[1] + 1)
    if len(a_values) * len(b_values) > 20000:
        return len(a_values) * len(b_values) // 2  # each key is reached by at most two ordered pairs
    return len({Problem(task, max(a, b), min(a, b)).key if spec.symbol == "-" else Problem(task, a, b).key
                for a, b in product(a_values, b_values)})


def draw_problems(task: str, n: int, rng: random.Random, exclude: set[tuple] = frozenset()) -> list[Problem]:
    """`n` distinct problems of `task` whose keys are not in `exclude`, drawn from `rng`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if n + len(exclude) > question_space(task):
        raise ValueError(f"task {task} has about {question_space(task)} distinct questions; asked for {n} + {len(exclude)}")
    spec = TASKS[task]
    seen, problems = set(exclude), []
    while len(problems) < n:
        a, b = rng.randint(*spec.a_range), rng.randint(*spec.b_range)
        if spec.symbol == "-" and a < b:
            a, b = b, a
        problem = Problem(task, a, b)
        if problem.key not in seen:
            seen.add(problem.key)
            problems.append(problem)
    return problems


def make_split(task: str, n_train: int, n_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train problems, held-out problems), disjoint by question, the same for the same arguments."""
    rng = random.Random(f"llm-modules real demo {task} {seed}")
    train = draw_problems(task, n_train, rng)
    held_out = draw_problems(task, n_eval, rng, exclude={p.key for p in train})
    return train, held_out


def assistant_text(problem: Problem) -> str:
    """`<|begin_of_thought|> 347 + 589 = 936 <|end_of_thought|> <|begin_of_solution|> 936 <|end_of_solution|>`."""
    return (f"{BEGIN_THOUGHT} {problem.expression} = {problem.answer} {END_THOUGHT} "
            f"{BEGIN_SOLUTION} {problem.answer} {END_SOLUTION}")


def stratos_row(problem: Problem, system: str = SYSTEM_PROMPT) -> dict:
    """The Bespoke-Stratos row of `problem` (see `llm_modules.data.conversation_turns`)."""
    return {
        "system": system,
        "conversations": [
            {"from": "user", "value": problem.question},
            {"from": "assistant", "value": assistant_text(problem)},
        ],
    }


def native_messages(problem: Problem) -> list[dict[str, str]]:
    """The question for a model's own chat template (the untrained systems): `What is 347 + 589? Answer with just
    the number.`"""
    return [{"role": "user", "content": f"{problem.question} {NATIVE_INSTRUCTION}"}]


def native_answer(reply: str, problem: Problem) -> str | None:
    """The number a chat reply answers: its first number, after a restatement of the question when the reply starts
    with one (SmolLM2 writes `347 + 589 = 1757` or `347 + 589 is 22.`, whose first number would be the operand)."""
    text = reply.strip()
    operands = r"\s*".join(re.escape(part) for part in problem.expression.split())
    restated = re.match(rf"{operands}\s*(=|is|equals)\s*", text)
    return first_number(text[restated.end():] if restated else text)


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?!\d)|-?\d+")


def first_number(text: str) -> str | None:
    """The first integer in `text`, thousands separators dropped (`1,036` -> `1036`), or None."""
    match = _NUMBER.search(text)
    return match.group().replace(",", "") if match else None

