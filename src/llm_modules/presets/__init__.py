"""Training settings shipped with the package, and the rule each training option's value must follow.

Presets are YAML files in this folder (`paper.yaml`: the paper's run), holding `TrainingOptions` keys; the first
comment line describes them. `llm-modules train --preset NAME` starts from one, and `--config` and flags win over it.

The rules are here, not in `training.py`, because they must be read without torch: `llm-modules train` checks its
flags with them at parse time (argparse's own exit 2), and `TrainingOptions` checks every value, from a config file,
a preset or Python, with the same ones.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import yaml


def names() -> list[str]:
    """The presets shipped with the package, sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def description(name: str) -> str:
    """The first comment line of preset `name`."""
    first = (resources.files(__name__) / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
    return first.lstrip("# ").strip()


def load(name: str) -> dict[str, Any]:
    """The options of preset `name` (`TrainingOptions` keys). Raises `ValueError` naming the presets there are."""
    if name not in names():
        raise ValueError(f"unknown preset {name!r} (presets: {', '.join(names())})")
    return yaml.safe_load((resources.files(__name__) / f"{name}.yaml").read_text(encoding="utf-8"))


# option -> (type, test, what the test asks, for messages). Floats must also be finite.
LIMITS: dict[str, tuple[type, Any, str]] = {
    "epochs": (float, lambda v: v > 0, "a number > 0"),
    "max_steps": (int, lambda v: v >= 1 or v == -1, "an integer >= 1 (or -1: train for epochs)"),
    "batch_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "grad_accum": (int, lambda v: v >= 1, "an integer >= 1"),
    "lr_bridge": (float, lambda v: v > 0, "a number > 0"),
    "lr_small": (float, lambda v: v > 0, "a number > 0"),
    "weight_decay": (float, lambda v: v >= 0, "a number >= 0"),
    "warmup": (float, lambda v: v >= 0 and (v < 1 or v == int(v)), "a fraction in [0, 1) or a whole number of steps"),
    "bridge_only_steps": (float, lambda v: v >= 0 and (v < 1 or v == int(v)),
                          "a fraction in [0, 1) or a whole number of steps"),
    "max_grad_norm": (float, lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "max_length": (int, lambda v: v >= 2, "an integer >= 2"),
    "subset": (float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "val_split": (float, lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "seed": (int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "patience": (int, lambda v: v >= 0, "an integer >= 0 (0: no early stopping)"),
    "min_delta": (float, lambda v: v >= 0, "a number >= 0"),
    "save_steps": (int, lambda v: v >= 1, "an integer >= 1"),
    "save_total_limit": (int, lambda v: v >= 1, "an integer >= 1"),
    "logging_steps": (int, lambda v: v >= 1, "an integer >= 1"),
    "max_nonfinite_steps": (int, lambda v: v >= 1, "an integer >= 1"),
}
# Options that may also be None (then the default behaviour described on `TrainingOptions` applies).
OPTIONAL = {"save_steps", "save_total_limit"}
CHOICES: dict[str, tuple[str, ...]] = {
    "loss_on": ("assistant", "all"),
    "small_init": ("pretrained", "scratch"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "large_dtype": ("auto", "float32", "bfloat16", "float16"),
    "feature_cache_dtype": ("float16", "bfloat16", "float32"),
}


def check_option(name: str, value: Any) -> Any:
    """`value` as option `name` takes it: text is parsed (flags, and YAML's `1e-4`, which PyYAML reads as a string),
    an integer is taken for a float. Options without a rule are returned unchanged.

    Raises `ValueError` ("must be ..., got ...", without the option's name: callers add the flag or key).
    """
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise ValueError(f"must be one of {', '.join(CHOICES[name])}, got {value!r}")
        return value
    if name not in LIMITS or (value is None and name in OPTIONAL):
        return value
    kind, test, wanted = LIMITS[name]
    problem = ValueError(f"must be {wanted}, got {value!r}")
    if isinstance(value, bool):
        raise problem
    if isinstance(value, str):
        try:
            value = kind(value)
        except ValueError:
            raise problem from None
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or (kind is float and not math.isfinite(value)) or not test(value):
        raise problem
    return value
