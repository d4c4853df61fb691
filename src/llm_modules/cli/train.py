"""`llm-modules train`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import presets
from .common import UsageError, int_at_least


def option(name: str) -> Callable[[str], Any]:
    """argparse type for the training option `name`: its rule in `presets.LIMITS`, the one `TrainingOptions` checks
    config values with. argparse names the flag and exits 2 on a value that breaks it."""
    def parse(text: str) -> Any:
        try:
            return presets.check_option(name, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name
    return parse


def add_train(subparsers) -> None:
    preset_help = "; ".join(f"{name}: {presets.description(name)}" for name in presets.names()).replace("%", "%%")
    parser = subparsers.add_parser(
        "train",
        help="train the bridge and the small model on Bespoke-Stratos-17k (or local files in its schema)",
        description="Train a combined model with transformers.Trainer on every row of the data (--preset paper: the "
        "paper's run). A --config YAML/JSON file may hold the same keys (with underscores) and any TrainingArguments "
        "field; it wins over the preset, and flags win over both. Runs unchanged under torchrun and accelerate launch.",
        argument_default=argparse.SUPPRESS,  # only what the user gives overrides the config file and the defaults
    )
    add = parser.add_argument
    add("--preset", choices=presets.names(), help=f"start from settings shipped with the package ({preset_help})")
    add("--config", help="YAML or JSON file of training options")
    add("--large", action="append", help="hub id, dir or .gguf file of the frozen large model (default: Qwen/Qwen2-1.5B); "
        "repeat it to compose several frozen sources that share one tokenizer")
    add("--small", help="hub id or dir of the small model (default: EleutherAI/gpt-neo-125M)")
    add("--source-fusion", choices=["separate", "concat"], help="with several --large: a bridge per source (separate, "
        "default) or one bridge over their concatenated hidden states")
    add("--num-depth-connections", type=int_at_least(1), metavar="K",
        help="add K gated cross-attentions per source from its inner layers into the small model's (CALM-style; "
        "zero-initialised); default: none, the paper's input bridge only")
    add("--head-init", choices=["random", "small"], help="start the new LM head at random (default, the paper) or, "
        "for tokens the small model's tokenizer also has, from the small model's output embeddings")
    add("--dataset", help="hub id, or a local .json/.jsonl/.parquet file or dir (default: bespokelabs/Bespoke-Stratos-17k)")
    add("--output-dir", help="where checkpoints, the final model and its model card go (default: llm-modules-stratos)")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=option("epochs"), help="epochs, > 0 (default 3; the paper: 15)")
    steps.add_argument("--max-steps", type=option("max_steps"), help="optimizer steps, instead of epochs")
    add("--batch-size", type=option("batch_size"), help="examples per device and step (default 1)")
    add("--grad-accum", type=option("grad_accum"), help="gradient accumulation steps (default 1)")
    add("--lr-bridge", type=option("lr_bridge"), help="learning rate of the bridge, > 0 (default 1e-4)")
    add("--lr-small", type=option("lr_small"), help="learning rate of the small model and the head, > 0 (default 5e-5)")
    add("--warmup", type=option("warmup"), help="warmup steps, or a fraction of all steps if < 1 (default 0)")
    add("--bridge-only-steps", type=option("bridge_only_steps"), help="train the bridge alone for the first steps "
        "(the small model and head wait), or that fraction of all steps if < 1 (default 0)")
    add("--max-length", type=option("max_length"), help="drop longer examples, in large-model tokens (default 4096)")
    add("--subset", type=option("subset"), help="random fraction in (0, 1] of the valid rows to train on "
        "(default 1: every row; the paper: 0.3)")
    add("--val-split", type=option("val_split"), help="validation fraction in [0, 1) (default 0.1)")
    add("--seed", type=option("seed"), help="seed of the subset, the split, the init and the data order (default 42)")
    add("--strict", action="store_true", help="stop at the first invalid row instead of skipping it")
    add("--loss-on", choices=presets.CHOICES["loss_on"], help="tokens in the loss (default assistant; all = the paper)")
    add("--small-init", choices=presets.CHOICES["small_init"], help="start the small model pretrained (default) or random")
    add("--save-steps", type=option("save_steps"), help="evaluate and checkpoint every N steps (default: every epoch)")
    add("--save-total-limit", type=option("save_total_limit"), help="checkpoints kept besides the best (default 2)")
    add("--logging-steps", type=option("logging_steps"), help="log every N steps (default 10)")
    add("--patience", type=option("patience"), help="early stopping patience in evaluations, 0 = off (default 5)")
    add("--min-delta", type=option("min_delta"), help="smallest validation loss improvement that counts (default 1e-4)")
    add("--precision", choices=presets.CHOICES["precision"], help="auto (default): bf16/fp16 on GPU, fp32 on CPU")
    add("--gradient-checkpointing", action="store_true", help="recompute the small model's activations in backward")
    add("--feature-cache", metavar="DIR", help="compute the frozen model's hidden states once, keep them in DIR")
    add("--resume", action="store_true", help="continue from the newest complete checkpoint in --output-dir")
    add("--push-to-hub", action="store_true", help="upload checkpoints and the final model (Trainer's push_to_hub)")
    add("--hub-model-id", help="repo id for --push-to-hub")
    add("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    parser.set_defaults(handler=run_train)


def merge_options(*layers: dict[str, Any]) -> dict[str, Any]:
    """Option mappings merged, later ones winning; a layer that sets `epochs` also drops an earlier `max_steps` (which
    would otherwise beat it)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if "epochs" in layer:
            merged.pop("max_steps", None)
        merged.update(layer)
    return merged


def run_train(args: argparse.Namespace) -> None:
    from ..data import DataFileError, EmptyDatasetError, InvalidRowError
    from ..feature_cache import FeatureCacheMismatch, FeatureRangeError
    from ..training import ConflictingOptionsError, TrainingOptions
    from ..training_run import run_training

    preset = presets.load(args.preset) if "preset" in args else {}
    config = read_config_file(args.config) if "config" in args else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("preset", "config", "handler", "command", "debug")}
    if "large" in flags:  # `--large A` stays the string it always was; several make a list
        flags["large"] = flags["large"][0] if len(flags["large"]) == 1 else flags["large"]
    composition = {k: flags.pop(k) for k in ("source_fusion", "num_depth_connections", "head_init") if k in flags}
    if composition:  # `LLMModulesConfig` options, on top of a config file's `model_options`
        flags["model_options"] = {**preset.get("model_options", {}), **config.get("model_options", {}), **composition}
    try:
        options = TrainingOptions.from_dict(merge_options(preset, config, flags))
    except (TypeError, ValueError) as error:
        # Flags were checked by argparse with the same rules: what is wrong here comes from the config file.
        raise UsageError(f"--config {args.config}: {error}" if "config" in args else str(error)) from error
    try:
        result = run_training(options)  # its data report and warnings reach stderr through `main`'s library_messages
    except InvalidRowError as error:
        raise UsageError(f"{options.dataset}: {error} (drop --strict to skip invalid rows)") from error
    except (DataFileError, EmptyDatasetError, FeatureCacheMismatch, FeatureRangeError, FileExistsError,
            ConflictingOptionsError) as error:
        raise UsageError(f"{error}") from error
    if result.trainer.is_world_process_zero():
        loss = f"{result.eval_loss:.4f}" if result.eval_loss is not None else "n/a"
        print(f"trained {result.trainer.state.global_step} steps; final validation loss {loss}")
        print(f"saved to {result.output_dir} (load with LLMModulesForCausalLM.from_pretrained({str(result.output_dir)!r}))")
    # Under `accelerate launch`, leave the process group before exit: a rank exiting with gloo's threads still running
    # aborts now and then ("terminate called without an active exception"; pytorch/pytorch#190489).
    result.trainer.accelerator.end_training()


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
