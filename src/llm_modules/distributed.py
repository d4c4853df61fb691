"""Training across processes: FSDP2 through accelerate, where the frozen sources go, sharded checkpoints.

Launching is accelerate's (`accelerate launch --config_file examples/accelerate/<fsdp2|ddp|deepspeed_zero2|
deepspeed_zero3>.yaml -m llm_modules train ...`, docs/training-at-scale.md); the Trainer builds its `Accelerator`
from what the launcher set. What this module adds, and why:

- **Placement of the frozen sources (the policy).** Under FSDP2 they are *sharded*, in units of their own: every
  decoder layer of a source is one `fully_shard` unit (accelerate's transformer-based wrap over the layer classes the
  model lists in `_no_split_modules`: the sources' and the small model's blocks) and the source's token embeddings are
  another (accelerate carves out `get_input_embeddings()`, which is the anchor source's). A unit holds frozen tensors
  only, so FSDP2 allocates no gradient for it; the root unit keeps the bridges, the head's neighbours and a source's
  final norm (a few thousand frozen values). A rank then holds 1/N of the frozen weights plus the one or two layers
  being all-gathered; replicating them would hold all of them on every rank (a 7B source in bf16: 14.2 GiB against
  1.8 GiB + one layer at 8 ranks, `llm-modules bench memory`). The price is one all-gather of the frozen weights per
  forward (no backward ever runs through them: they run under `no_grad`). Under DDP the frozen sources are
  replicated (DDP has no other way); under ZeRO-3 DeepSpeed partitions them like the trained weights.
  They are never in the optimizer (`training.parameter_groups` takes `requires_grad` parameters only, and FSDP2 gets
  the model and the optimizer in one `prepare`, as accelerate requires) and never get a gradient (`requires_grad`
  is False and their forward runs under `no_grad`).
- **FSDP2 on CPU.** accelerate turns FSDP on only for GPU-type runs (`AcceleratorState`: multi-CPU runs stay DDP,
  silently, even under an FSDP config); torch's `fully_shard` runs on CPU with gloo. `enable_fsdp2_on_cpu` turns it
  on for a multi-CPU run whose launcher asked for FSDP2, which is how the tests train with FSDP2 on CPU.
- **Checkpoints.** A sharded checkpoint holds the trained weights only (`ignore_frozen_params`: the frozen sources
  are on disk already, where they were loaded from; accelerate's own save would write a 7B source into every
  checkpoint), in `torch.distributed.checkpoint` format under `pytorch_model_fsdp_0/` (accelerate's name, so that
  `merge_fsdp_weights` reads it), the optimizer's shards under `optimizer_0/` (accelerate's save). The final model is
  gathered one trained tensor at a time and saved with `save_pretrained` (trained weights only, as always);
  `convert_checkpoint` turns a sharded checkpoint into that layout in one process.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's name for a sharded model checkpoint (merge_fsdp_weights reads it)
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja")


# ---- turning FSDP2 on ---------------------------------------------------------------------------------------------


def fsdp_requested() -> bool:
    """The launcher asked for FSDP (`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp2_on_cpu(accelerator) -> bool:
    """Make a multi-CPU run that was launched with an FSDP2 config train with FSDP2; True when it did.

    accelerate's `AcceleratorState` sets FSDP only for GPU-type distributed runs and leaves a multi-CPU run as DDP,
    without a word. `fully_shard` itself runs on CPU with gloo, so here the state is set as accelerate sets it on GPUs:
    distributed type FSDP and the plugin read from the launcher's environment. FSDP1 does not run on CPU: refused.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested():
        return False
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP without GPUs needs fsdp_version: 2 in the accelerate config (FSDP1 runs on GPUs only)")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin  # AcceleratorState's attributes are its shared state: every instance sees these
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def is_fsdp2(trainer) -> bool:
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return trainer.is_fsdp_enabled and getattr(plugin, "fsdp_version", 1) == 2


def is_sharded_state_dict(trainer) -> bool:
    return "SHARDED_STATE_DICT" in str(trainer.accelerator.state.fsdp_plugin.state_dict_type)


# ---- trained weights: gathered, saved sharded, loaded --------------------------------------------------------------


def gather_trained_state_dict(model, keep: bool) -> dict[str, torch.Tensor]:
    """The trained tensors of an FSDP2-sharded model, whole, on the CPU, one all-gather per tensor: never the frozen
    ones (accelerate's `get_state_dict` gathers every tensor of the model, a 7B source included). Every rank must call
    it (the gathers are collective); only ranks with `keep` get the tensors back."""
    from torch.distributed.tensor import DTensor

    names = set(model.trained_state_dict())
    gathered = {}
    for name, param in model.named_parameters():
        if name not in names:
            continue
        tensor = param.full_tensor() if isinstance(param, DTensor) else param
        if keep:
            gathered[name] = tensor.detach().cpu()
    return gathered


def _trained_options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kwargs)


def save_sharded_trained(model, checkpoint_dir: str | os.PathLike) -> None:
    """Each rank writes its shards of the trained weights to `checkpoint_dir/pytorch_model_fsdp_0` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_trained_options())
    dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(str(Path(checkpoint_dir) / FSDP_MODEL_DIR)))


def load_sharded_trained(model, checkpoint_dir: str | os.PathLike) -> None:
    """Load the trained weights of a sharded checkpoint into an FSDP2-sharded model, each rank its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    directory = Path(checkpoint_dir) / FSDP_MODEL_DIR
    if not directory.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir} holds no sharded weights ({FSDP_MODEL_DIR}/): it was not saved by an FSDP run")
    state = get_model_state_dict(model, options=_trained_options())
    dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(str(directory)))
    set_model_state_dict(model, state, options=_trained_options(strict=False))


# ---- conversion -----------------------------------------------------------------------------------------------------


def convert_checkpoint(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """A sharded checkpoint (`checkpoint-N` of an FSDP2 run) as a `save_pretrained` dir: config, tokenizer and the
    trained weights in one `model.safetensors`, loadable with `LLMModulesForCausalLM.from_pretrained(output_dir)` in
    one process. Runs without any process group (accelerate's `merge_fsdp_weights`, on the CPU)."""
    from accelerate.utils import merge_fsdp_weights
    from safetensors.torch import load_file, save_file

    from .checkpoints import WEIGHTS_NAME

    checkpoint, output = Path(checkpoint_dir), Path(output_dir)
    if not (checkpoint / FSDP_MODEL_DIR).is_dir():
        raise FileNotFoundError(f"{checkpoint} is no sharded checkpoint (it has no {FSDP_MODEL_DIR}/ dir)")
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} has no config.json: not a checkpoint of llm-modules train")
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output) as scratch:
        merge_fsdp_weights(str(checkpoint / FSDP_MODEL_DIR), scratch, safe_serialization=True)
        tensors = {name: t.contiguous() for name, t in load_file(str(Path(scratch) / "model.safetensors")).items()}
    tmp = output / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "llm_modules": "trained-only"})
    os.replace(tmp, output / WEIGHTS_NAME)
    for name in METADATA_FILES:
        if (checkpoint / name).is_file() and checkpoint.resolve() != output.resolve():
            shutil.copyfile(checkpoint / name, output / name)
    return output


# ---- the Trainer's hooks ----------------------------------------------------------------------------------------------


class ShardedTrainingMixin:
    """Trainer methods for FSDP2 (see the module docstring); under DDP or one process they defer to the Trainer.
    `LLMModulesTrainer` inherits it before `transformers.Trainer`."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if enable_fsdp2_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True
        if self.is_fsdp_enabled and not (is_fsdp2(self) and is_sharded_state_dict(self)):
            raise ValueError(
                "FSDP: use fsdp_version: 2 and fsdp_state_dict_type: SHARDED_STATE_DICT (examples/accelerate/fsdp2.yaml); "
                "other FSDP settings would write the frozen sources into every checkpoint"
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if _internal_call:
            # A checkpoint: its weights are saved sharded (_save_optimizer_and_scheduler); here only what loads them.
            model.save_pretrained(output_dir, is_main_process=self.args.should_save, weights=False)
            return
        state = gather_trained_state_dict(model, keep=self.args.should_save)
        model.save_pretrained(output_dir, is_main_process=self.args.should_save, state_dict=state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        save_sharded_trained(self.model, output_dir)
        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_sharded(self, checkpoint: str) -> bool:
        """Load a checkpoint's trained weights under FSDP2; False when this run is no FSDP2 run."""
        if not self.is_fsdp_enabled:
            return False
        load_sharded_trained(self.model, checkpoint)
        return True
