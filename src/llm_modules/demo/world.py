"""A synthetic world of fictional people, the text the knowledge source learns them from, and the task rows.

People in split A and split B share every attribute value (each value occurs in A), so a model can only answer
about B by knowing B's biographies: the knowledge source read them, the small model never did.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..data import render_prompt

SYLLABLES = [
    "ka", "lo", "mi", "ra", "ve", "to", "su", "ne", "da", "ri", "po", "zel", "mar", "vin", "tor", "bel",
    "sa", "no", "fi", "gu", "len", "dor", "qua", "shi", "bu", "ten", "rho", "wil", "jan", "pe",
]
# Attribute -> its values. Every value also occurs in split A (see `make_world`).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "birth_year": tuple(str(year) for year in range(1960, 1970)),
    "city": ("Lisbon", "Oslo", "Cairo", "Lima", "Seoul", "Dublin", "Quito", "Hanoi", "Tunis", "Riga"),
    "job": ("baker", "pilot", "nurse", "farmer", "painter", "lawyer", "tailor", "dentist", "sailor", "chemist"),
    "instrument": ("piano", "violin", "flute", "drums", "harp", "cello", "guitar", "trumpet", "oboe", "banjo"),
}
# Several paraphrases per fact: the source sees each person's facts in varied wording and order. A biography names
# the person in its first sentence; later sentences use the name or "they", so the source also learns to recall a
# fact about the person named earlier.
BIOGRAPHY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_year": ("{name} was born in {value}.", "{name} came into the world in {value}.", "{name}'s birth year is {value}."),
    "city": ("{name} lives in {value}.", "{name} has a home in {value}.", "{name} resides in the city of {value}."),
    "job": ("{name} works as a {value}.", "{name} earns a living as a {value}.", "{name} is a {value} by trade."),
    "instrument": ("{name} plays the {value}.", "{name} practises the {value} every day.", "{name}'s instrument is the {value}."),
}
PRONOUN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_year": ("They were born in {value}.", "They came into the world in {value}.", "Their birth year is {value}."),
    "city": ("They live in {value}.", "They have a home in {value}.", "They reside in the city of {value}."),
    "job": ("They work as a {value}.", "They earn a living as a {value}.", "They are a {value} by trade."),
    "instrument": ("They play the {value}.", "They practise the {value} every day.", "Their instrument is the {value}."),
}
# The source's own question wording, shared by its QA lines and the task's user turn.
QUESTIONS: dict[str, str] = {
    "birth_year": "In which year was {name} born?",
    "city": "In which city does {name} live?",
    "job": "What job does {name} have?",
    "instrument": "Which instrument does {name} play?",
}
# The source answers in its own wording, the first biography template.
NATIVE_QA = "Q: {question} A: {answer}"  # the source's plain QA format, seen for split A only
TASK_SYSTEM_PROMPT = "Answer with a Thought section, then a Solution section."
ATTRIBUTE_NOUNS = {"birth_year": "birth year", "city": "city", "job": "job", "instrument": "instrument"}


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict[str, str]


@dataclass(frozen=True)
class World:
    split_a: list[Person]  # the task is trained on these
    split_b: list[Person]  # the task is evaluated on these; only the knowledge source read about them

    @property
    def people(self) -> list[Person]:
        return self.split_a + self.split_b


def make_name(rng: random.Random) -> str:
    return "".join(rng.sample(SYLLABLES, 3)).capitalize()


def make_world(num_a: int, num_b: int, seed: int) -> World:
    """`num_a + num_b` people with unique names and uniformly drawn facts; every value of every attribute is in A."""
    largest = max(len(values) for values in ATTRIBUTES.values())
    if num_a < largest:
        raise ValueError(f"split A needs at least {largest} people so that every value occurs in it, got {num_a}")
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < num_a + num_b:
        names.add(make_name(rng))
    names_in_order = sorted(names)
    rng.shuffle(names_in_order)
    columns = {}
    for attribute, values in ATTRIBUTES.items():
        # A starts with one of each value (then shuffled), so no answer about B is a value A never showed.
        column_a = list(values) + [rng.choice(values) for _ in range(num_a - len(values))]
        rng.shuffle(column_a)
        columns[attribute] = column_a + [rng.choice(values) for _ in range(num_b)]
    people = [
        Person(name, {attribute: columns[attribute][i] for attribute in ATTRIBUTES})
        for i, name in enumerate(names_in_order)
    ]
    return World(split_a=people[:num_a], split_b=people[num_a:])


def biography(person: Person, rng: random.Random, attributes: Sequence[str] = tuple(ATTRIBUTES)) -> list[str]:
    """One paraphrase of the person's biography (the facts of `attributes`), as sentences: facts in random order, a
    random template each, the name in the first sentence and the name or "they" in the others."""
    attributes = list(attributes)
    rng.shuffle(attributes)
    sentences = []
    for i, attribute in enumerate(attributes):
        templates = BIOGRAPHY_TEMPLATES if i == 0 or rng.random() < 0.5 else PRONOUN_TEMPLATES
        sentences.append(rng.choice(templates[attribute]).format(name=person.name, value=person.facts[attribute]))
    return sentences


def question(person: Person, attribute: str) -> str:
    return QUESTIONS[attribute].format(name=person.name)


def statement(person: Person, attribute: str) -> str:
    """The fact in the source's own wording (its first biography template), e.g. `Kalomira lives in Oslo.`"""
    return BIOGRAPHY_TEMPLATES[attribute][0].format(name=person.name, value=person.facts[attribute])


def pronoun_statement(person: Person, attribute: str) -> str:
    """The fact in the source's own words about someone named before, e.g. `They live in Oslo.`"""
    return PRONOUN_TEMPLATES[attribute][0].format(value=person.facts[attribute])


def cloze(person: Person, attribute: str) -> str:
    """The source's own wording up to the fact, e.g. `Kalomira lives in`: at its end the source holds the fact."""
    return BIOGRAPHY_TEMPLATES[attribute][0].split("{value}")[0].format(name=person.name).rstrip()


def native_prompt(person: Person, attribute: str) -> str:
    """The source's own QA prompt; its answer is `statement(...)` after one space."""
    return NATIVE_QA.format(question=question(person, attribute), answer="").rstrip()


def native_line(person: Person, attribute: str, rng: random.Random) -> str:
    """A QA line in the source's plain format; the answer names the person or says "they" (its two wordings)."""
    answer = rng.choice((statement(person, attribute), pronoun_statement(person, attribute)))
    return NATIVE_QA.format(question=question(person, attribute), answer=answer)


def task_row(person: Person, attribute: str) -> dict:
    """A Bespoke-Stratos-schema row asking for one fact, in a format the knowledge source never saw.

    The question ends in the source's own wording (`Kalomira lives in ___.`), where the frozen source holds the
    fact; the thought recalls it in the source's words about the person just named (`They live in Oslo.`), where
    the source holds it again; the solution is the value. No answer names the person: every token a model must
    write also occurs in split A's rows.
    """
    answer = (
        f"<|begin_of_thought|> {pronoun_statement(person, attribute)} <|end_of_thought|> "
        f"<|begin_of_solution|> {person.facts[attribute]} <|end_of_solution|>"
    )
    return {
        "system": TASK_SYSTEM_PROMPT,
        "conversations": [
            {"from": "user", "value": f"Fill in the blank: {cloze(person, attribute)} ___."},
            {"from": "assistant", "value": answer},
        ],
    }


def task_rows(people: list[Person]) -> list[dict]:
    return [task_row(person, attribute) for person in people for attribute in ATTRIBUTES]


def render_row(row: dict) -> str:
    """A task row as the models read it: the paper's prompt layout followed by the answer."""
    question, answer = (turn["value"] for turn in row["conversations"])
    return render_prompt([{"role": "user", "content": question}], system=row["system"]) + answer


def majority_baseline(world: World) -> float:
    """Exact match on B of always answering each attribute's most common value in A."""
    hits = 0
    for attribute in ATTRIBUTES:
        guess = Counter(p.facts[attribute] for p in world.split_a).most_common(1)[0][0]
        hits += sum(p.facts[attribute] == guess for p in world.split_b)
    return hits / (len(world.split_b) * len(ATTRIBUTES))


def tokenizer_corpus(world: World, seed: int) -> list[str]:
    """Text a general-purpose tokenizer would cover: biographies, both QA formats and the task's wording."""
    rng = random.Random(seed)
    texts = [" ".join(biography(p, rng)) for p in world.people for _ in range(2)]
    texts += [native_line(p, a, rng) for p in world.people for a in ATTRIBUTES]
    texts += [render_row(row) for row in task_rows(world.split_a)]
    return texts
