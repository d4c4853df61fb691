"""`llm-modules train`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import UsageError, int_at_least


def add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the bridge and the small model on Bespoke-Stratos-17k (or local files in its schema)",
        description="Train a combined model with transformers.Trainer. Defaults are the paper's settings; a --config "
        "YAML/JSON file may hold the same keys (with underscores) and any TrainingArguments field; flags win over it. "
        "Runs unchanged under torchrun and accelerate launch.",
        argument_default=argparse.SUPPRESS,  # only what the user gives overrides the config file and the defaults
    )
    add = parser.add_argument
    add("--config", help="YAML or JSON file of training options")
    add("--large", help="hub id or dir of the frozen large model (default: Qwen/Qwen2-1.5B)")
    add("--small", help="hub id or dir of the small model (default: EleutherAI/gpt-neo-125M)")
    add("--dataset", help="hub id, or a local .json/.jsonl/.parquet file or dir (default: bespokelabs/Bespoke-Stratos-17k)")
    add("--output-dir", help="where checkpoints, the final model and its model card go")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float, help="epochs (default 15)")
    steps.add_argument("--max-steps", type=int_at_least(1), help="optimizer steps, instead of epochs")
    add("--batch-size", type=int_at_least(1), help="examples per device and step (default 1)")
    add("--grad-accum", type=int_at_least(1), help="gradient accumulation steps (default 1)")
    add("--lr-bridge", type=float, help="learning rate of the bridge (default 1e-4)")
    add("--lr-small", type=float, help="learning rate of the small model and the head (default 5e-5)")
    add("--warmup", type=float, help="warmup steps, or a fraction of all steps if < 1 (default 0)")
    add("--max-length", type=int_at_least(2), help="drop longer examples, in large-model tokens (default 4096)")
    add("--subset", type=float, help="random fraction of the rows to use (default 0.3, as the paper)")
    add("--val-split", type=float, help="validation fraction (default 0.1)")
    add("--seed", type=int, help="seed of the subset, the split, the init and the data order (default 42)")
    add("--strict", action="store_true", help="stop at the first invalid row instead of skipping it")
    add("--loss-on", choices=["assistant", "all"], help="tokens in the loss (default assistant; all = the paper)")
    add("--small-init", choices=["pretrained", "scratch"], help="start the small model pretrained or random")
    add("--save-steps", type=int_at_least(1), help="evaluate and checkpoint every N steps (default: every epoch)")
    add("--save-total-limit", type=int_at_least(1), help="checkpoints kept besides the best (default 2)")
    add("--logging-steps", type=int_at_least(1), help="log every N steps (default 10)")
    add("--patience", type=int_at_least(0), help="early stopping patience in evaluations, 0 = off (default 5)")
    add("--min-delta", type=float, help="smallest validation loss improvement that counts (default 1e-4)")
    add("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="auto: bf16/fp16 on GPU, fp32 on CPU")
    add("--gradient-checkpointing", action="store_true", help="recompute the small model's activations in backward")
    add("--feature-cache", metavar="DIR", help="compute the frozen model's hidden states once, keep them in DIR")
    add("--resume", action="store_true", help="continue from the newest complete checkpoint in --output-dir")
    add("--push-to-hub", action="store_true", help="upload checkpoints and the final model (Trainer's push_to_hub)")
    add("--hub-model-id", help="repo id for --push-to-hub")
    add("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> None:
    import logging

    from .data import EmptyDatasetError, InvalidRowError
    from .feature_cache import FeatureCacheMismatch
    from .training import TrainingOptions, run_training

    values = {}
    if "config" in args:
        values = read_config_file(args.config)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "handler", "command", "debug")}
    if "epochs" in flags:  # a flag for epochs beats max_steps from the config file, and the other way round
        values.pop("max_steps", None)
    try:
        options = TrainingOptions.from_dict({**values, **flags})
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from error
    handler = logging.StreamHandler()  # our data report and warnings, on stderr next to the Trainer's logs
    handler.setFormatter(logging.Formatter("%(message)s"))
    library_logger = logging.getLogger("llm_modules")
    library_logger.addHandler(handler)
    library_logger.setLevel(logging.INFO)
    try:
        result = run_training(options)
    except InvalidRowError as error:
        raise UsageError(f"{options.dataset}: {error} (drop --strict to skip invalid rows)") from error
    except (EmptyDatasetError, FeatureCacheMismatch, FileExistsError) as error:
        raise UsageError(f"{error}") from error
    finally:
        library_logger.removeHandler(handler)
    if result.trainer.is_world_process_zero():
        loss = f"{result.eval_loss:.4f}" if result.eval_loss is not None else "n/a"
        print(f"trained {result.trainer.state.global_step} steps; final validation loss {loss}")
        print(f"saved to {result.output_dir} (load with LLMModulesForCausalLM.from_pretrained({str(result.output_dir)!r}))")


def read_config_file(path: str) -> dict:
    """A YAML or JSON mapping of training options."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        values = json.loads(file.read_text()) if file.suffix == ".json" else yaml.safe_load(file.read_text())
    except (ValueError, yaml.YAMLError) as error:
        raise UsageError(f"--config {path}: not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {error}") from error
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of options, got {type(values).__name__}")
    return values
