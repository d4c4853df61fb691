"""README's Python example runs as written, with the hub ids swapped for tiny local models."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tiny_pair, tmp_path, monkeypatch):
    block = re.search(r"## Python\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert '"Qwen/Qwen2-1.5B"' in block and '"EleutherAI/gpt-neo-125M"' in block
    code = block.replace('"Qwen/Qwen2-1.5B"', repr(str(tiny_pair[0]))).replace(
        '"EleutherAI/gpt-neo-125M"', repr(str(tiny_pair[1]))
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "my-combined-model" / "model.safetensors").is_file()
    assert namespace["loss"].item() > 0


def test_quickstart_runs_the_demo_and_ci_runs_the_readme_test_command():
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    main_job, test_command = re.findall(r"```bash\n(.*?)\n```", quickstart, re.S)
    assert main_job == "pip install -e . && llm-modules demo"
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command in ci
