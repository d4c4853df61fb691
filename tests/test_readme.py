"""README's Quickstart, and the Python example of the docs' Python API page, as written: the example runs with the hub
ids swapped for tiny local models; the Quickstart puts the CPU build of torch first and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYTHON_API = ROOT / "docs" / "python-api.md"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"


def quickstart_blocks(path: Path) -> list[str]:
    quickstart = path.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", quickstart, re.S)


def test_python_api_example_runs(tiny_pair, tmp_path, monkeypatch):
    block = re.search(r"## Python\n\n```python\n(.*?)```", PYTHON_API.read_text(), re.S).group(1)
    assert '"Qwen/Qwen2-1.5B"' in block and '"EleutherAI/gpt-neo-125M"' in block
    code = block.replace('"Qwen/Qwen2-1.5B"', repr(str(tiny_pair[0]))).replace(
        '"EleutherAI/gpt-neo-125M"', repr(str(tiny_pair[1]))
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(PYTHON_API), "exec"), namespace)
    assert (tmp_path / "my-combined-model" / "model.safetensors").is_file()
    assert namespace["loss"].item() > 0


def test_quickstart_runs_the_demo_and_ci_runs_the_readme_test_command():
    cpu_torch, main_job, test_command = quickstart_blocks(README)
    # The CPU build comes before the install that would otherwise bring the CUDA build, in the range we pin.
    assert cpu_torch.startswith("pip install ") and "download.pytorch.org/whl/cpu" in cpu_torch
    assert '"torch>=2.6,<2.15"' in cpu_torch and '"torch>=2.6,<2.15"' in (ROOT / "pyproject.toml").read_text()
    assert main_job == "pip install -e . && llm-modules demo"
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci
    assert ci.rstrip().splitlines()[-1] == test_command  # the last thing CI does
    # The Getting started page repeats the Quickstart: the same commands, in the same order.
    assert quickstart_blocks(GETTING_STARTED) == [cpu_torch, main_job, test_command]
