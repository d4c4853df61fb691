"""`small_gold`: the small model distilled from the frozen large one across tokenizers, with TRL's GOLD trainer.

Source: `trl.experimental.gold` (GOLD, Patiño et al. 2025, "Unlocking On-Policy Distillation for Any Model Family"),
whose cross-tokenizer loss extends Universal Logit Distillation (ULD, Boizard et al. 2024, arXiv 2402.12030).

Every weight of the small causal LM (the student) trains, in float32; the large model (the teacher, float32) is frozen
and only run forward. The student reads each row exactly as `encode_conversation` tokenizes it, the layout the other
systems train on and the evaluation prompts with: `task_prompt_and_reference(row)`'s prompt, the answer tokenized on
its own, EOS. So GOLD gets token ids (`gold_example`): its own preparation of prompt/completion text tokenizes the two
as one string without special tokens (no BOS; BPE may merge across the seam). The teacher reads the same two texts in
its own tokenizer (GOLD's `build_teacher_inputs_from_texts`: the prompt with its special tokens, the answer apart, its
EOS). `lmbda=0` (our default): every step distils on the rows' reference answers; `lmbda` is the fraction of steps
whose answers the student samples itself (`max_completion_length` tokens), far beyond a CPU budget.

The loss, per row, over its answer: each answer token carries its UTF-8 byte span in the answer text, and ULD cuts the
answer into groups at the byte boundaries both tokenizers share (`use_extended_uld`, ByteLevel BPE tokenizers only).
A group of one token per side compares the two distributions predicting it (`[vocab]` each). Where the splits differ
(815 one token on one side, 8 1 5 on the other) the pieces are merged by the chain rule (`uld_token_merge_strategy=
"bayesian"`; TRL's default "observed" takes each piece's distribution over the piece after it): the last piece's
distribution times the earlier pieces' probabilities, so the split side's vector is over the last piece's
alternatives (815 sits under the string "5") while the other's is over whole tokens. The hybrid loss (TRL's documented
example, 0.6/0.4; without it the sorted L1 alone carries no token identity) compares the entries of token strings both
vocabularies share by generalized JSD (`beta`) and the sorted probabilities of the rest by L1: for a mismatched number
the JSD compares different events ("5" after "81" against "5" as the whole number), the known weakness of
cross-tokenizer distillation on arithmetic, which `digit_splits` reports for the pair. The EOS position is in the loss
(TRL skips it by default), so the student learns to stop as the other systems do; the cross-entropy on the reference
answers is added with weight 1, as ULD's paper trains (TRL's default weight is 0). `gold_options` override any
`GOLDConfig` field.

`eval_loss`, the selection metric, is GOLD's `prediction_step`: this loss over the validation rows' reference answers
(no sampling), averaged over the rows; a mix of JSD and L1 between probability vectors, not a cross-entropy.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl.import_utils import TRLExperimentalWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TRLExperimentalWarning)  # the module docstring says it is experimental
    from trl.experimental.gold import GOLDConfig, GOLDTrainer
    from trl.experimental.utils import encode_with_byte_offsets

from ..data import encode_conversation
from ..evaluation import task_prompt_and_reference
from ..training_log import keep_logs_off_terminal, log_file_callbacks
from .fitting import BestEpochCallback, Fit, FitBudget
from .systems import budget_arguments, load_plain, trainable

logger = logging.getLogger(__name__)

# Our settings where they differ from GOLDConfig's (the module docstring says why).
GOLD_DEFAULTS: dict[str, Any] = {
    "uld_use_hybrid_loss": True, "uld_hybrid_matched_weight": 0.6, "uld_hybrid_unmatched_weight": 0.4,
    "uld_token_merge_strategy": "bayesian", "uld_skip_student_eos": False, "uld_skip_teacher_eos": False,
    # ULD's paper trains on the answers' cross-entropy plus the distillation term; TRL's default (0) drops the first,
    # and the teacher has no opinion on the rows' format markers, so the student would hardly learn the format.
    "uld_crossentropy_weight": 1.0,
}
RECORDED = ("lmbda", "beta", "temperature", "top_p", "max_completion_length", "seq_kd", "disable_dropout",
            "use_extended_uld", "uld_use_hybrid_loss", "uld_hybrid_matched_weight", "uld_hybrid_unmatched_weight",
            "uld_token_merge_strategy", "uld_crossentropy_weight", "uld_distillation_weight",
            "uld_student_temperature", "uld_teacher_temperature", "uld_skip_student_eos", "uld_skip_teacher_eos")


def digit_splits(tokenizer_a: PreTrainedTokenizerBase, tokenizer_b: PreTrainedTokenizerBase,
                 numbers: tuple[str, ...] = ("7", "42", "815", "1234", "-771")) -> dict[str, list[list[str]]]:
    """How two tokenizers split each number as it follows a space in running text: `{number: [pieces in a, pieces
    in b]}`, each piece decoded to text (`" 42"` -> `[[" ", "4", "2"], [" 42"]]`)."""
    def pieces(tokenizer: PreTrainedTokenizerBase, number: str) -> list[str]:
        return [tokenizer.decode([i]) for i in tokenizer(f" {number}", add_special_tokens=False)["input_ids"]]

    return {number: [pieces(tokenizer_a, number), pieces(tokenizer_b, number)] for number in numbers}


def gold_example(row: dict, tokenizer: PreTrainedTokenizerBase, byte_offsets: bool) -> dict[str, Any]:
    """One row as GOLD's collator takes it pre-tokenized: `encode_conversation`'s ids, `completion_mask` (1 from the
    answer's first token to EOS), each answer token's byte span in the answer (`[0, 0]` on the prompt; EOS gets the
    empty span at the answer's end; all zero when `byte_offsets` is False), and the texts the teacher re-tokenizes."""
    prompt, answer = task_prompt_and_reference(row)
    input_ids = encode_conversation(row, tokenizer)["input_ids"]
    if byte_offsets:
        [(answer_ids, spans)] = encode_with_byte_offsets(tokenizer.backend_tokenizer, [answer])
    else:
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        spans = [(0, 0)] * len(answer_ids)
    start = len(input_ids) - len(answer_ids) - 1
    if list(answer_ids) != input_ids[start:-1]:
        raise ValueError("the answer's tokens differ from encode_conversation's: the two tokenizations disagree")
    end = len(answer.encode("utf-8")) if byte_offsets else 0
    return {"input_ids": input_ids, "completion_mask": [0] * start + [1] * (len(input_ids) - start),
            "byte_offsets": [(0, 0)] * start + [tuple(span) for span in spans] + [(end, end)],
            "original_prompt_text": prompt, "original_completion_text": answer}


class PositionedGOLDTrainer(GOLDTrainer):
    """GOLD's collator pads on the left; the student gets position ids counted from each row's first real token, as
    generation gives them (our other systems pad on the right), so absolute-position students (GPT-2, GPT-Neo) train
    at the positions they answer at."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        position_ids = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return super().compute_loss(model, {**inputs, "position_ids": position_ids}, return_outputs,
                                    num_items_in_batch)


def fit_small_gold(small_dir: Path, large_dir: Path, train_rows: list[dict], val_rows: list[dict], budget: FitBudget,
                   lr: float, output_dir: Path, log_file: Path, *, lmbda: float = 0.0, progress: bool = True,
                   **gold_options: Any) -> Fit:
    """Distil the frozen large model (`large_dir`) into the small one (`small_dir`) on the rows under the fairness
    rule (`fitting.py`); the student of the best epoch, in eval mode, is `Fit.model`. `gold_options` override
    `GOLDConfig` fields (`GOLD_DEFAULTS` and TRL's defaults otherwise)."""
    torch.manual_seed(budget.seed)
    student, tokenizer = load_plain(small_dir)
    teacher, teacher_tokenizer = load_plain(large_dir)
    teacher.requires_grad_(False)
    splits = digit_splits(tokenizer, teacher_tokenizer)
    logger.info("small_gold digit splits [student, teacher]: %s", splits)
    best = BestEpochCallback(budget.patience, budget.min_delta)
    args = GOLDConfig(**budget_arguments(
        budget, output_dir, lr, progress, bf16=False, fp16=False, activation_checkpointing=False, max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True}, use_uld_loss=True,
        teacher_tokenizer_name_or_path=str(large_dir), lmbda=lmbda, **{**GOLD_DEFAULTS, **gold_options}))
    offsets = args.use_extended_uld
    trainer = keep_logs_off_terminal(PositionedGOLDTrainer(
        model=student.train(), teacher_model=teacher, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list([gold_example(row, tokenizer, offsets) for row in train_rows]),
        eval_dataset=Dataset.from_list([gold_example(row, tokenizer, offsets) for row in val_rows]),
        callbacks=[*log_file_callbacks(log_file), best],
    ))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    best.restore(student)
    extra = {name: getattr(args, name) for name in RECORDED}
    extra.update({"teacher": str(large_dir), "digit_splits": splits,
                  "digit_splits_differ": [number for number, (a, b) in splits.items() if a != b]})
    return Fit(student.eval(), tokenizer, lr, trainable(student), seconds, best.best_seconds, best.best_epoch,
               best.best_step, best.best, float(trainer.state.epoch or 0), trainer.state.log_history, extra)


__all__ = ["GOLD_DEFAULTS", "PositionedGOLDTrainer", "digit_splits", "fit_small_gold", "gold_example"]
