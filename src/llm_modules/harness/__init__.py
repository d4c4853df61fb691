"""lm-evaluation-harness on saved combined models: `python -m llm_modules.harness` runs lm-eval's own command line.

Importing this package registers what lm-eval needs, without `trust_remote_code`:

- the combined model with transformers' Auto classes (`llm_modules.modeling` does it on import), so lm-eval's `hf`
  model loads a saved dir with `AutoModelForCausalLM.from_pretrained(dir)`;
- an lm-eval model named `llm-modules`: lm-eval's `hf` model (the same loglikelihood and generate_until code) whose
  generated text keeps the Stratos markers. `hf` decodes with `skip_special_tokens=True`, which drops the markers
  when the tokenizer holds them as special tokens (the tiny test tokenizers do; Qwen's does not), and with them
  the solution section that the tasks score and the stop string `<|end_of_solution|>`. Control tokens (EOS,
  padding, end of turn) are dropped as in `llm-modules eval` (`generation.decode_answer`).

The task YAMLs shipped in `tasks/` (added to lm-eval's task list by the entry point): the built-in compare tasks as
`generate_until` (`llm_modules_sub3`, ..., `llm_modules_gsm`, `llm_modules_stdlib`), any Stratos file
(`llm_modules_stratos`, the rows `llm-modules eval` scores) and `llm_modules_arithmetic_3ds`, a `loglikelihood` task
in the layout of lm-eval's `arithmetic_3ds`, generated locally. See docs/evaluation-and-compare.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MODEL_NAME = "llm-modules"
INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'llm-modules[lm-eval]'"

_registered = False


def register() -> None:
    """Register the combined model with transformers' Auto classes and the `llm-modules` model with lm-eval's
    registry (once). Raises `ImportError` with an install hint when lm-eval is missing."""
    global _registered
    if _registered:
        return
    from .. import modeling  # noqa: F401  (AutoConfig / AutoModelForCausalLM registration)

    try:
        from lm_eval.api.registry import register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error

    class LLMModulesLM(HFLM):
        """lm-eval's `hf` model on a saved combined model (any causal LM works too); decoded text keeps the markers."""

        def __init__(self, pretrained, **kwargs):
            # Our config type is not in transformers' causal-LM table; say what it is instead of letting lm-eval guess.
            kwargs.setdefault("backend", "causal")
            super().__init__(pretrained=pretrained, **kwargs)
            from ..generation import control_token_ids

            self._control_ids = control_token_ids(self.tokenizer, self.model)

        def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
            from ..generation import decode_answer

            ids = [tokens] if isinstance(tokens, int) else list(tokens)
            if not skip_special_tokens:
                return self.tokenizer.decode(ids, skip_special_tokens=False)
            return decode_answer(self.tokenizer, ids, self._control_ids)

    register_model(MODEL_NAME)(LLMModulesLM)
    _registered = True


def with_task_path(argv: list[str]) -> list[str]:
    """lm-eval arguments with `--include_path` set to our task dir (lm-eval reads one dir there).

    Raises `ValueError` when the arguments set `--include_path` themselves."""
    argv = list(argv)
    if any(arg == "--include_path" or arg.startswith("--include_path=") for arg in argv):
        raise ValueError(f"--include_path is set to the shipped tasks ({TASKS_DIR}); to add tasks of your own, copy "
                         "them there or run lm-eval itself after `import llm_modules.harness; "
                         "llm_modules.harness.register()`")
    if not argv or argv[0] in ("-h", "--help"):
        return argv  # lm-eval's help
    if argv[0] not in ("run", "ls", "validate"):
        argv.insert(0, "run")  # lm-eval's own legacy form: no command means `run`
    return [*argv, "--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> None:
    """`python -m llm_modules.harness [run] --model llm-modules --model_args pretrained=DIR --tasks ...`: lm-eval's
    command line with our model and tasks registered."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        register()
        argv = with_task_path(argv)
    except (ImportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


__all__ = ["MODEL_NAME", "TASKS_DIR", "main", "register", "with_task_path"]
