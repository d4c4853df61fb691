"""A Trainer's logs in a file instead of on the terminal: the progress bar stays, every log dict (loss, learning rate,
grad norm, eval metrics, the final runtime) goes as one JSON line to a file such as OUTPUT/logs/NAME.jsonl, and to
TensorBoard beside it (OUTPUT/logs/NAME/) when tensorboard is installed.

transformers' `ProgressCallback` writes each log dict under its bar (its `on_log`), and `disable_tqdm=True` only swaps
it for `PrinterCallback`, which prints them too. So a Trainer goes quiet by replacing that callback, through the
Trainer's own `pop_callback`/`add_callback`: `keep_logs_off_terminal` does it for any Trainer that has a
`LogFileCallback`.

    trainer = keep_logs_off_terminal(Trainer(..., callbacks=log_file_callbacks(output_dir / "logs" / "run.jsonl")))
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback, is_tensorboard_available


class LogFileCallback(TrainerCallback):
    """Appends every Trainer log to a JSON Lines file, with its optimizer step: `{"step": 10, "loss": 2.31, ...}`.
    A new run starts the file afresh; a resumed one (from a checkpoint) continues it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if state.global_step == 0:
                self.path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")


class QuietProgressCallback(ProgressCallback):
    """transformers' progress bars, named and cleared when training ends, without the log dicts under them."""

    def __init__(self, desc: str | None = None):
        super().__init__()
        self.desc = desc

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.desc)
            self.training_bar.leave = False  # the caller prints one line for the result instead

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass  # the LogFileCallback has them


def log_file_callbacks(path: str | Path) -> list[TrainerCallback]:
    """Callbacks that write a Trainer's logs to `path` (JSON Lines) and, when tensorboard is installed, to TensorBoard
    in the folder of the same name without the suffix. Give them to the Trainer, then `keep_logs_off_terminal` it."""
    path = Path(path)
    callbacks: list[TrainerCallback] = [LogFileCallback(path)]
    if is_tensorboard_available():
        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(path.with_suffix(""))  # read at on_train_begin, instead of output_dir/runs
        callbacks.append(tensorboard)
    return callbacks


def keep_logs_off_terminal(trainer: Trainer) -> Trainer:
    """When `trainer` writes its logs to a file (it has a `LogFileCallback`), stop it printing them: its progress bar
    (named after the log file) stays. Any other trainer is left as it is. Returns `trainer`."""
    log_files = [c for c in trainer.callback_handler.callbacks if isinstance(c, LogFileCallback)]
    if not log_files:
        return trainer
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgressCallback(desc=log_files[0].path.stem))
    trainer.pop_callback(PrinterCallback)  # disable_tqdm=True: no bar, and no printed logs either
    return trainer


__all__ = ["LogFileCallback", "QuietProgressCallback", "keep_logs_off_terminal", "log_file_callbacks"]
