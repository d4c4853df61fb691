"""`llm-modules serve --engine vllm`: check the saved model, then run `vllm serve DIR` with our flags translated.

The server is vLLM's own OpenAI server (paged KV cache, continuous batching, tensor parallelism with
`--vllm-option=--tensor-parallel-size=N` on GPUs); our plugin (entry point `vllm.general_plugins`) gives it the
model class. vLLM may live in another environment (it pins transformers < 5.20): `equality.vllm_python` finds it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from .equality import vllm_python
from .support import check_supported, saved_config


def vllm_serve_command(
    directory: Path,
    *,
    python: str,
    name: str,
    host: str,
    port: int,
    dtype: str,
    max_num_seqs: int,
    api_key: str | None = None,
    allowed_origins: list[str] | None = None,
    large_model: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The `vllm serve` command line for a saved combined model dir."""
    command = [
        python, "-m", "llm_modules.vllm.cli", "serve", str(directory), "--served-model-name", name,
        "--host", host, "--port", str(port), "--dtype", dtype, "--max-num-seqs", str(max_num_seqs),
        # CUDA graphs and torch.compile of three stacks cost minutes at startup on a CPU and were not measured here.
        "--enforce-eager",
    ]
    if api_key:
        command += ["--api-key", api_key]
    if allowed_origins:
        command += ["--allowed-origins", json.dumps(allowed_origins)]
    if large_model:  # the frozen source moved since training: override the path recorded in config.json
        command += ["--hf-overrides", json.dumps({"large_model_name_or_path": str(Path(large_model).resolve())})]
    return command + list(extra or [])


def serve_on_vllm(directory: Path, **options) -> int:
    """Check that vLLM can serve `directory` (UnsupportedForVllm / ValueError say why not), then run vLLM's server
    until it stops; returns its exit code. RuntimeError when no vLLM environment is found."""
    check_supported(saved_config(directory))
    python = vllm_python()
    if python is None:
        raise RuntimeError(
            "vLLM is not installed here and no vLLM environment was found: create one as docs/serving-at-scale.md "
            "says and name its python in LLM_MODULES_VLLM_PYTHON"
        )
    env = {**os.environ}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on the CPU backend (vLLM's default is 4)
    return run_forwarding_signals(vllm_serve_command(directory, python=python, **options), env=env)


def run_forwarding_signals(command: list[str], env: dict[str, str]) -> int:
    """Run `command` until it exits, passing SIGINT and SIGTERM sent to this process on to it, so that stopping
    `llm-modules serve --engine vllm` stops vLLM (a terminal's Ctrl-C reaches both; `kill -INT` reaches only us).
    Raises KeyboardInterrupt after the server has exited on SIGINT (the command then exits 130, as our own server)."""
    process = subprocess.Popen(command, env=env)
    received: list[int] = []

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        if process.poll() is None:
            process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signal.SIGINT in received:
        raise KeyboardInterrupt
    return code
