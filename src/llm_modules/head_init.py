"""Starting the new LM head from the small model's own output embeddings (`LLMModulesConfig.head_init="small"`).

The paper starts the head over the large tokenizer's vocabulary at random, so the first steps only relearn which
direction of the small model's last hidden state means which token. Where the two tokenizers share a token (the same
string in both vocabularies, e.g. digits and common words between Qwen2 and SmolLM2's byte-level BPEs), the small
model already has that direction: its output embedding (its LM head row; the token embedding when they are tied).
Copying those rows is the shared-token initialisation of vocabulary transfer (e.g. FOCUS, Dobler and de Melo 2023,
which also copies overlapping tokens' embeddings). Measured on the real pair in docs/getting-started.md ("The demo on
real models").
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


def init_head_from_small(
    head_weight: torch.Tensor, tokenizer: PreTrainedTokenizerBase, small_tokenizer: PreTrainedTokenizerBase,
    small_output_embeddings: torch.Tensor,
) -> int:
    """Copy into `head_weight` (`[vocab of tokenizer, D_S]`, in place) the row of `small_output_embeddings`
    (`[vocab of small_tokenizer, D_S]`) of every token whose string both vocabularies hold. Returns how many rows were
    copied; the others are left as they are. Raises ValueError when the widths differ."""
    if head_weight.shape[-1] != small_output_embeddings.shape[-1]:
        raise ValueError(f"the head is {head_weight.shape[-1]} wide but the small model's output embeddings are "
                         f"{small_output_embeddings.shape[-1]} wide")
    small_vocab = small_tokenizer.get_vocab()
    pairs = [(i, small_vocab[token]) for token, i in tokenizer.get_vocab().items()
             if token in small_vocab and i < head_weight.shape[0] and small_vocab[token] < small_output_embeddings.shape[0]]
    if pairs:
        rows, small_rows = (torch.tensor(ids) for ids in zip(*pairs))
        with torch.no_grad():
            head_weight[rows.to(head_weight.device)] = small_output_embeddings[small_rows.to(
                small_output_embeddings.device)].to(device=head_weight.device, dtype=head_weight.dtype)
    return len(pairs)


def small_output_embeddings(small_model, small_source: str, trust_remote_code: bool = False) -> torch.Tensor:
    """The small model's LM head weight `[its vocab, D_S]`: its token embeddings when the checkpoint ties them
    (`tie_word_embeddings`, e.g. SmolLM2, GPT-Neo), else the LM head loaded from `small_source`. Call it before the
    combined model frees the small model's token embeddings."""
    if getattr(small_model.config, "tie_word_embeddings", False):
        return small_model.get_input_embeddings().weight.detach()
    from .sources import load_causal_lm

    return load_causal_lm(small_source, trust_remote_code=trust_remote_code).get_output_embeddings().weight.detach()


__all__ = ["init_head_from_small", "small_output_embeddings"]
