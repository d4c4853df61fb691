"""The model card (README.md) of a trained combined model: the base models, the data it was really trained on, the
settings, the final validation loss and how to load it. Written by `training.train` and published by `--push-to-hub`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .data import DataReport

if TYPE_CHECKING:
    from .training import TrainingOptions


def write_model_card(
    output_dir: str | os.PathLike,
    options: TrainingOptions | None = None,
    large: str | list[str] | None = None,
    small: str | None = None,
    data: DataReport | str | None = None,
    train_examples: int | None = None,
    validation_examples: int | None = None,
    eval_loss: float | None = None,
    steps: int | None = None,
    skipped_nonfinite_steps: int = 0,
) -> Path:
    """README.md of a trained model: the two base models, what it was trained on, the settings, the final validation
    loss, how to load it.

    `data` is the `DataReport` of the training data or a one-line description; None: the card says the data was not
    recorded (it never assumes the default dataset of `options`). `large` and `small` name the base models (default:
    those in `options`; `large` may list several frozen sources); the hub metadata lists only names that are hub ids,
    not local paths.
    """
    from .run_checkpoints import write_atomic
    from .training import DATA_PREPARATION, TrainingOptions  # training imports this module

    options = options or TrainingOptions(output_dir=str(output_dir))
    large, small = large or options.large, small or options.small
    sources = [large] if isinstance(large, str) else list(large)
    frozen = " and ".join(f"`{name}`" for name in sources)
    loss = f"{eval_loss:.4f}" if eval_loss is not None and math.isfinite(eval_loss) else "not measured (no validation split)"
    hub_models = [name for name in (*sources, small) if not os.path.isabs(name)]
    metadata = ["library_name: llm-modules", "tags: [llm-modules, cross-attention, knowledge-transfer]"]
    if isinstance(data, DataReport) and data.split is not None:
        metadata.append(f"datasets: [{data.source}]")
    if hub_models:
        metadata.append(f"base_model: [{', '.join(hub_models)}]")
    examples = ""
    if train_examples is not None:
        examples = f"\n- Examples: {train_examples} training, {validation_examples or 'no'} validation."
    settings = {
        k: v for k, v in options.to_dict().items()
        if k not in ("output_dir", "large", "small", *DATA_PREPARATION) and v not in (None, {}, [])
    }
    newline = "\n"
    card = f"""---
{newline.join(metadata)}
---

# LLM Modules: {Path(small).name} wired to a frozen {" and ".join(Path(name).name for name in sources)}

A small causal LM (`{small}`, {options.small_init} start) reads the last hidden states of \
{"a frozen large one" if len(sources) == 1 else f"{len(sources)} frozen large ones"} ({frozen}) through trainable \
Enhanced Cross-Attention layers and predicts tokens of the large model's tokenizer with a new head (LLM Modules, \
arXiv 2502.08213). This repository holds only the trained weights (bridges, small model, head) and the configs; the \
frozen {"model is" if len(sources) == 1 else "models are"} loaded from {frozen}.

## Training

{_describe_data(data)}{examples}
- Steps: {steps if steps is not None else "?"}; non-finite steps skipped: {skipped_nonfinite_steps}.
- Final validation loss: **{loss}**

Settings:

```json
{json.dumps(settings, indent=2, default=str)}
```

## Use

```python
from llm_modules import LLMModulesForCausalLM
from llm_modules.data import render_prompt

model = LLMModulesForCausalLM.from_pretrained("{Path(options.output_dir).resolve()}")  # or this repo id
prompt = render_prompt([{{"role": "user", "content": "What is 2 + 3?"}}], system=model.config.system_prompt)
inputs = model.tokenizer(prompt, return_tensors="pt")
print(model.tokenizer.decode(model.generate(**inputs, max_new_tokens=256)[0]))
```

or `llm-modules generate --model {Path(options.output_dir).resolve()} --prompt "What is 2 + 3?"`.
"""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, card)
    return path


def _describe_data(data: DataReport | str | None) -> str:
    """The model card's lines on the training data."""
    if data is None:
        return "- Data: not recorded (the datasets were given to `llm_modules.training.train` already prepared)."
    if isinstance(data, str):
        return f"- Data: {data}"
    if data.source is None:
        source = "rows given in memory (no file or hub id recorded)"
    elif data.split is not None:
        revision = f", revision `{data.revision}`" if data.revision else ""
        source = f"`{data.source}` (hub dataset, split `{data.split}`{revision})"
    else:
        source = f"`{data.source}`"
    limit = f"examples over {data.max_length} tokens dropped" if data.max_length is not None else "no length limit"
    drawn = f"; subset and split drawn once with seed {data.seed}" if data.seed is not None else ""
    return f"- Data: {source}\n- Rows: {data.summary()}\n- Loss on {data.loss_on} tokens and EOS; {limit}{drawn}."
