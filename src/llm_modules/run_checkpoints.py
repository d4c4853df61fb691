"""A training run's checkpoints on disk: which are complete, how one is published whole, which one `--resume`
continues from, and atomic writes.

Split out of training.py (which keeps the Trainer and its options; the run is training_run.py) because it passed
700 lines: this is the file-system side of a run, with no Trainer in it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger("llm_modules.training")  # the training log's name: users filter on it

COMPLETE_MARKER = "checkpoint_complete.json"
# Where a checkpoint is written before it is renamed to OUTPUT/checkpoint-N. A dir of its own (not a sibling
# `tmp-checkpoint-N`) so the Trainer writes `checkpoint-N` under it unchanged, keeping the name that its hub push and
# its best-checkpoint bookkeeping use.
STAGING_DIR = ".partial-checkpoints"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint dirs whose save finished (their marker exists), oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        p for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if p.name.split("-")[-1].isdigit() and (p / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Saves that never finished: staged checkpoints (a crash during a save) and, from versions that wrote in place,
    checkpoint dirs without a completion marker."""
    root = Path(output_dir)
    complete = set(complete_checkpoints(root))
    staged = sorted((root / STAGING_DIR).glob(f"{PREFIX_CHECKPOINT_DIR}-*"))
    return [*staged, *(p for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p not in complete)]


def fsync_tree(directory: Path) -> None:
    """Every file under `directory` on disk, so that a rename published after it never names lost data."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Rename the whole checkpoint `staged` to `final` (same filesystem: one atomic rename). A `final` already there
    (a leftover of this step) is moved aside first and removed after, so `final` never holds a mix of two saves."""
    stale = staged.with_name(staged.name + ".stale")
    if final.exists():
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(staged, final)
    descriptor = os.open(final.parent, os.O_RDONLY)  # the rename itself on disk
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    shutil.rmtree(stale, ignore_errors=True)
    try:
        staged.parent.rmdir()  # the staging dir, once empty
    except OSError:
        pass


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that `path` is either absent or whole: temp file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def checkpoint_to_resume(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a crash mid-save) are never used. None, with one warning
    line, when there is none: a run killed during its first save then simply starts again (transformers'
    `resume_from_checkpoint=True` raises there instead, which left deleting the dir by hand as the only way on)."""
    found = complete_checkpoints(output_dir)
    if not found:
        logger.warning(f"--resume: no complete checkpoint in {output_dir}: starting from step 0")
        return None
    state = json.loads((found[-1] / "trainer_state.json").read_text())  # transformers' TrainerState, as saved
    logger.info(f"resuming from {found[-1].name} (step {state['global_step']} of {state['max_steps']})")
    return found[-1]


def refuse_to_mix_runs(output_dir: str | os.PathLike) -> None:
    """A fresh run must not write into another run's checkpoints (rotation and best-model tracking would mix them)."""
    if complete_checkpoints(output_dir):
        raise FileExistsError(
            f"{output_dir} already holds checkpoints: pass --resume to continue that run, or use another --output-dir"
        )
