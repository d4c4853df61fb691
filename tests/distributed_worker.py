"""One training run through the Python `train()`, for tests/test_distributed.py: launched as one process, or as two
by `accelerate launch` with a config of examples/accelerate/. Rank 0 writes what the test checks to RESULT (JSON):
the logged losses, whether every frozen tensor is bit-identical to what was loaded, whether the optimizer holds
trained parameters only, and the parallelism the run had.

    python tests/distributed_worker.py RESULT LARGE SMALL DATA OUTPUT_DIR MAX_STEPS BATCH_SIZE SAVE_STEPS [--resume]
"""

from __future__ import annotations

import json
import sys

import torch

torch.set_num_threads(1)

from torch.distributed.fsdp import FSDPModule  # noqa: E402

from llm_modules import LLMModulesForCausalLM  # noqa: E402
from llm_modules.bridge import transformer_blocks  # noqa: E402
from llm_modules.data import prepare_datasets  # noqa: E402
from llm_modules.training import TrainingOptions, train  # noqa: E402


def full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def main(argv: list[str]) -> None:
    result, large, small, data, output_dir, max_steps, batch_size, save_steps = argv[:8]
    resume = "--resume" in argv
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(large, small, cross_attention_heads=4, dropout=0.0)
    frozen = {name: tensor.clone() for name, tensor in model.sources.state_dict().items()}
    rows = [json.loads(line) for line in open(data)]
    train_set = prepare_datasets(rows, model.tokenizer, val_split=0.0, subset=1.0)[0]
    options = TrainingOptions(
        output_dir=output_dir, max_steps=int(max_steps), batch_size=int(batch_size), lr_bridge=3e-3, lr_small=3e-3,
        logging_steps=1, subset=1.0, val_split=0.0, report_to="none", save_steps=int(save_steps), resume=resume,
        save_total_limit=None, trainer_args={"disable_tqdm": True},
    )
    trainer = train(model, model.tokenizer, train_set, None, options)
    model = trainer.accelerator.unwrap_model(trainer.model)
    # Every rank takes part in the gathers; the frozen tensors are compared whole, as they were loaded.
    frozen_params = list(model.sources.parameters())
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(frozen_params):  # ZeRO-3 partitions the frozen weights too
            identical = [n for n, t in model.sources.state_dict().items() if torch.equal(t, frozen[n])]
    else:
        identical = [n for n, t in model.sources.state_dict().items() if torch.equal(full(t), frozen[n])]
    # DeepSpeed's optimizer holds flat partitions of what it was given (the trained groups): checked elsewhere.
    optimized = [] if trainer.is_deepspeed_enabled else [p for g in trainer.optimizer.param_groups for p in g["params"]]
    report = {
        "losses": {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log},
        "steps": trainer.state.global_step,
        "frozen_identical": len(identical) == len(frozen),
        "frozen_tensors": len(frozen),
        "frozen_without_grad": all(p.grad is None and not p.requires_grad for p in frozen_params),
        "optimizer_trained_only": None if trainer.is_deepspeed_enabled else (
            all(p.requires_grad for p in optimized)
            and len(optimized) == sum(1 for p in model.parameters() if p.requires_grad)),
        "deepspeed": trainer.is_deepspeed_enabled,
        "world_size": trainer.args.world_size,
        "fsdp": trainer.is_fsdp_enabled,
        # FSDP2's units over the frozen sources: each decoder layer one of its own (distributed.py's policy).
        "frozen_layers": sum(len(transformer_blocks(source)) for source in model.sources),
        "frozen_layer_units": sum(isinstance(layer, FSDPModule) for source in model.sources for layer in transformer_blocks(source)),
        "sharded_params": sum(type(p).__name__ == "DTensor" or "DTensor" in type(p.data).__name__ for p in model.parameters()),
    }
    if trainer.is_world_process_zero():
        with open(result, "w") as handle:
            json.dump(report, handle)
    trainer.accelerator.end_training()  # as `llm-modules train` does: no rank exits with the process group alive


if __name__ == "__main__":
    main(sys.argv[1:])
