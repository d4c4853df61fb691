"""The documentation site builds with `mkdocs build --strict` (no broken link, anchor, page or API reference), its
CLI reference is every parser's --help, and the Training page's command runs as written on the sample rows in
examples/, with the tiny models swapped in and a few steps."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from llm_modules.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "stratos-sample.jsonl"


def documented_commands(path: Path, needle: str) -> list[list[str]]:
    """Each `llm-modules ...` line (continuations joined, comments dropped) of the bash block holding `needle`."""
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S) if needle in b]
    assert blocks, f"no bash block with {needle!r} in {path.name}"
    lines = blocks[0].replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("llm-modules ")]


def swap(argv: list[str], replacements: dict[str, str]) -> list[str]:
    return [replacements.get(arg, arg) for arg in argv]


def set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        argv = list(argv)
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


def test_sample_file_is_twenty_valid_stratos_rows():
    from llm_modules.data import check_rows

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert len(rows) == 20
    valid, skipped = check_rows(rows, strict=True)
    assert len(valid) == 20 and not skipped


def test_training_page_command_runs_on_the_sample(tiny_pair, tmp_path, monkeypatch, capsys, one_thread):
    commands = documented_commands(ROOT / "docs" / "training.md", "examples/stratos-sample.jsonl")
    programs = [argv[1] for argv in commands]
    assert programs[:3] == ["smoke-test", "train", "generate"], programs
    train, generate = commands[1], commands[2]
    # README's "What you can do" shows the same train command.
    assert train in documented_commands(ROOT / "README.md", "examples/stratos-sample.jsonl")

    monkeypatch.chdir(ROOT)  # the page says: run from the repository's root (the relative --dataset path)
    output = tmp_path / "tiny-run"
    replacements = {"tiny/large": str(tiny_pair[0]), "tiny/small": str(tiny_pair[1]), "tiny-run": str(output)}
    argv = swap(train[1:], replacements)
    argv = set_flag(set_flag(argv, "--max-steps", "3"), "--save-steps", "3")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "20 rows read, 20 valid" in captured.err
    assert (output / "model.safetensors").is_file() and (output / "README.md").is_file()

    assert main(set_flag(swap(generate[1:], replacements), "--max-new-tokens", "4")) == 0


def test_readme_links_reach_docs_pages_and_their_headings():
    """README is outside the site, so mkdocs does not check its links: every relative link names a file that exists,
    and an anchor names a heading of that page (GitHub's ids, which mkdocs.yml gives the site too)."""
    from pymdownx.slugs import slugify

    slug = slugify(case="lower")
    links = re.findall(r"\]\((?!https?:)([^)#]+)(?:#([^)]+))?\)", (ROOT / "README.md").read_text())
    assert len(links) > 10
    for path, anchor in links:
        assert (ROOT / path).exists(), path
        if anchor:
            headings = re.findall(r"^#+ (.*)$", (ROOT / path).read_text(), re.M)
            assert anchor in {slug(h, "-") for h in headings}, (path, anchor)


def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict` as CI runs it: the docs packages come with the test extra, so a missing one fails."""
    site = tmp_path / "site"
    env = {**os.environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    # The CLI reference is generated from the parsers: every command and subcommand has its section and its help.
    cli = (site / "cli" / "index.html").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name in commands:
        assert f'id="llm-modules-{name}"' in cli, name
    assert 'id="llm-modules-bench-decode"' in cli and 'id="llm-modules-bench-train"' in cli
    # The Python API reference resolved the public API from the docstrings.
    api = (site / "python-api" / "index.html").read_text()
    for name in ("configuration.LLMModulesConfig", "modeling.LLMModulesForCausalLM.from_large_and_small",
                 "training.train", "training.TrainingOptions", "compare.run_compare", "compare.CompareSettings",
                 "serving.ModelServer", "fetch.fetch"):
        assert f'id="llm_modules.{name}"' in api, name
