"""Run `llm-modules train ARGS...` and SIGKILL this very process while checkpoint-N is half written, as a crash would.

    python tests/train_until_killed.py N ARGS...

The weights of checkpoint-N are on disk by then, its optimizer and trainer state are not. Used by
tests/test_training.py to check that --resume skips the broken checkpoint and ends with the weights of an
uninterrupted run.
"""

import os
import signal
import sys

from transformers import Trainer

from llm_modules import cli

step, argv = int(sys.argv[1]), sys.argv[2:]
save_optimizer = Trainer._save_optimizer_and_scheduler


def save_then_die(self, output_dir):
    if self.state.global_step == step:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    save_optimizer(self, output_dir)


Trainer._save_optimizer_and_scheduler = save_then_die
sys.exit(cli.main(argv))
