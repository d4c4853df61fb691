"""Which standard-library module defines a name: the `stdlib` built-in task of `llm-modules compare`, a knowledge task
that is not arithmetic.

``Which module of Python's standard library defines `isdir`?`` -> `os.path`. A code model such as Qwen2.5-Coder has
read this in its training data; a 135M general model mostly has not, and the name alone rarely gives the module away
(`getsizeof` is `sys`, `gamma` is `math`, `groupby` is `itertools`). The knowledge has to come from the frozen model.

The questions come from `stdlib_names.tsv` (packaged; `name<TAB>module`): the functions and classes of popular
modules (their `__all__`, or the public names they define when they have none: `exports`) that people use, counted
in the one code corpus every Python install carries, the standard library's own source (`usage_counts`: a name is
asked when at least `MIN_USES` files of it use that name of that module; the most used first, at most 10 a module).
A first table drew names evenly from each module's whole API (`spawnvpe`, `sched_get_priority_min`):
Qwen2.5-Coder-1.5B knew only half of them, so the task could not show knowledge moving from the large model. A name
is kept only when no other standard-library module has something *else* of that name (`dumps` is `json`'s and
`pickle`'s, so it is left out; `os.path.isdir` is `posixpath.isdir`, the same object, so it stays) and no other
popular module lists it too (`compare_digest` is both `hmac`'s and `secrets'`), dropping exceptions. The table was
written once by `python -m llm_modules.compare.stdlib > stdlib_names.tsv` on CPython 3.11.7, and is read as data:
another Python's standard library would give another table, and a task must ask the same questions everywhere.

Each seed draws its train and held-out names from the table without overlap (a name is one question; modules are
shared, so the train rows show the answer format and some of the modules). Trained systems are scored on the solution
section; untrained chat models on the first module of the table their reply names (`native_answer`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..data import ANSWER_MARKERS

BEGIN_THOUGHT, END_THOUGHT, BEGIN_SOLUTION, END_SOLUTION = ANSWER_MARKERS
SYSTEM_PROMPT = "Name the Python standard-library module."
NATIVE_INSTRUCTION = "Answer with just the module name."
TABLE = "stdlib_names.tsv"
DESCRIPTION = "which Python standard-library module defines a name"

# The modules the table was written from: popular ones, as a Python programmer meets them.
POPULAR_MODULES = """os os.path sys json re math random itertools functools collections datetime time shutil subprocess
pathlib string textwrap statistics heapq bisect copy glob fnmatch csv hashlib base64 uuid urllib.parse urllib.request
socket threading multiprocessing asyncio logging argparse unittest inspect operator struct zipfile tarfile gzip pickle
tempfile difflib calendar decimal fractions contextlib dataclasses enum io platform signal traceback warnings weakref
html secrets pprint queue shlex getpass locale unicodedata zlib binascii hmac ast dis codecs array cmath importlib
typing collections.abc sqlite3 select selectors mimetypes webbrowser http.client http.server email.utils
xml.etree.ElementTree configparser pdb timeit cProfile gc atexit""".split()
PER_MODULE = 10
# A name is asked only when this many files of the standard library's own code use it (`usage_counts`).
MIN_USES = 2
# Never imported while writing the table: they open windows, print, or are the test suite.
NOT_IMPORTED = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
                "venv", "pydoc_data"}


@dataclass(frozen=True)
class Question:
    name: str  # `isdir`
    module: str  # `os.path`

    @property
    def question(self) -> str:
        return f"Which module of Python's standard library defines `{self.name}`?"


@lru_cache(maxsize=1)
def load_table() -> tuple[Question, ...]:
    """Every question of the packaged table, in its order."""
    text = resources.files(__package__).joinpath(TABLE).read_text(encoding="utf-8")
    return tuple(Question(*line.split("\t")) for line in text.splitlines() if line.strip())


def check_size(n_train: int, n_eval: int) -> None:
    """Raises `ValueError` when the table has fewer than `n_train + n_eval` names (bad input: checked before a run)."""
    size = len(load_table())
    if n_train + n_eval > size:
        raise ValueError(f"task stdlib has {size} questions; asked for {n_train} train + {n_eval} held-out")


def make_split(n_train: int, n_eval: int, seed: int) -> tuple[list[Question], list[Question]]:
    """(train questions, held-out questions), disjoint, drawn from `seed`. Raises `ValueError` when the table has fewer
    than `n_train + n_eval` names."""
    check_size(n_train, n_eval)
    table = list(load_table())
    random.Random(f"llm-modules stdlib {seed}").shuffle(table)
    return table[:n_train], table[n_train:n_train + n_eval]


def stratos_row(question: Question, system: str = SYSTEM_PROMPT) -> dict:
    """`{"system", "conversations": [question, thought + solution]}`; the thought names the name with its module."""
    answer = (f"{BEGIN_THOUGHT} `{question.name}` is in {question.module} {END_THOUGHT} "
              f"{BEGIN_SOLUTION} {question.module} {END_SOLUTION}")
    return {"system": system, "conversations": [{"from": "user", "value": question.question},
                                                {"from": "assistant", "value": answer}]}


def native_messages(question: Question) -> list[dict[str, str]]:
    """The question for an untrained chat model's own template."""
    return [{"role": "user", "content": f"{question.question} {NATIVE_INSTRUCTION}"}]


@lru_cache(maxsize=1)
def _module_pattern() -> re.Pattern:
    # Longest first, so `os.path` wins over `os` and `collections.abc` over `collections` at the same place.
    modules = sorted({q.module for q in load_table()} | set(POPULAR_MODULES), key=len, reverse=True)
    return re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, modules)) + r")(?![\w])")


def native_answer(reply: str, question: Question) -> str | None:
    """The module a chat reply names: the first module of the table in it (`The `isdir` function is in the `os.path`
    module` -> `os.path`), else its first word without backticks and a final period, else None. A reply that only
    writes a call (`os.path.isdir(p)`) names its module too."""
    found = _module_pattern().search(reply.replace("`", " "))
    if found:
        return found.group(1)
    words = reply.replace("`", " ").split()
    return words[0].rstrip(".") if words else None


def usage_counts(modules: list[str] = POPULAR_MODULES, root: str | Path | None = None) -> dict[tuple[str, str], int]:
    """How many files of this Python's own standard library (its `Lib/`, without the test suite and the module
    itself) use each `(module, name)` of `modules`: `os.path.isdir(p)` after `import os`, `shutil.which` after
    `import shutil as sh`, or `from os.path import isdir`. The standard library is the code corpus every Python
    install carries, so the count is the same wherever the table is written from the same Python.

    Read with `ast` (no module is imported); a file that does not parse is skipped. `root`: another source tree
    read the same way (tests)."""
    import ast
    import sysconfig

    wanted = set(modules)
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    counts: dict[tuple[str, str], int] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in NOT_IMPORTED or parts[0] in ("site-packages", "dist-packages") or "tests" in parts:
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        own = ".".join(parts).removesuffix(".py").removesuffix(".__init__")
        aliases: dict[str, str] = {}  # a name in this file -> the module it is
        used: set[tuple[str, str]] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:  # `import os.path` binds `os`
                        aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module in wanted and not node.level:
                used.update((node.module, alias.name) for alias in node.names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                chain, value = [node.attr], node.value
                while isinstance(value, ast.Attribute):
                    chain.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id in aliases:
                    dotted = ".".join([aliases[value.id], *reversed(chain[1:])])
                    if dotted in wanted:
                        used.add((dotted, node.attr))
        for module, name in used:
            if module != own and not (module == "os.path" and own == "posixpath"):
                counts[module, name] = counts.get((module, name), 0) + 1
    return counts


def exports(module, name: str) -> bool:
    """Whether `module` lists `name` as its own: in its `__all__`, or, for a module without one, a public name whose
    object was defined there or in a private module it wraps (`math.floor`; `hmac.compare_digest` from `_operator`),
    not one it imports from another public module (`selectors.namedtuple`)."""
    if name.startswith("_") or not hasattr(module, name):
        return False
    if hasattr(module, "__all__"):
        return name in module.__all__
    defined_in = getattr(getattr(module, name), "__module__", None)
    return defined_in is None or defined_in == module.__name__ or defined_in.startswith("_")


def collect_names(modules: list[str] = POPULAR_MODULES, per_module: int = PER_MODULE,
                  min_uses: int = MIN_USES, uses: dict[tuple[str, str], int] | None = None) -> list[Question]:
    """The table as this Python's standard library gives it (see the module docstring). Imports every importable
    standard-library module but `NOT_IMPORTED`: run it to write a new table, never to ask questions."""
    import importlib
    import inspect
    import sys
    import warnings

    owners: dict[str, set[int]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(set(sys.stdlib_module_names) - NOT_IMPORTED) + list(modules):
            try:
                module = importlib.import_module(name)
            except Exception:  # platform-only modules (msvcrt, winreg) and optional ones (tkinter's _tkinter)
                continue
            for attribute in dir(module):
                if not attribute.startswith("_"):
                    owners.setdefault(attribute, set()).add(id(getattr(module, attribute, None)))
    imported = {name: importlib.import_module(name) for name in modules}
    uses = usage_counts(modules) if uses is None else uses
    # The same object listed by two popular modules (`secrets.compare_digest` is `hmac.compare_digest`) has two
    # answers; one a module only imports (`inspect.namedtuple`) does not count.
    listed = {name: sum(exports(module, name) for module in imported.values()) for name in owners}
    table = []
    for name, module in imported.items():
        candidates = []
        for attribute in sorted(a for a in dir(module) if exports(module, a)):
            value = getattr(module, attribute, None)
            is_function = inspect.isfunction(value) or inspect.isbuiltin(value)
            if (attribute.startswith("_") or len(attribute) < 4 or len(owners.get(attribute, ())) != 1
                    or listed.get(attribute) != 1
                    or not (is_function or inspect.isclass(value))
                    or (inspect.isclass(value) and issubclass(value, BaseException))
                    or uses.get((name, attribute), 0) < min_uses):
                continue
            candidates.append((-uses[name, attribute], attribute))
        table += [Question(attribute, name) for _, attribute in sorted(candidates)[:per_module]]
    return table


if __name__ == "__main__":
    print("\n".join(f"{q.name}\t{q.module}" for q in collect_names()))
