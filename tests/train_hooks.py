"""``python tests/train_hooks.py [train flags]``: ``python -m fastlm.train`` with test callbacks, for the
tests that run training as a separate process (kill trials, signals). Environment:

  HOOK_STEP_SLEEP   seconds to sleep after every optimizer step (slows the loop down)
  HOOK_SAVE_PAUSE   seconds to sleep between writing a checkpoint and publishing it (widens the
                    window in which a SIGKILL lands inside a save)
  HOOK_FAIL_SAVE_AT the save of this step fails as on a full disk (OSError ENOSPC) before publishing
"""

import errno
import os
import signal
import sys
import time

from fastlm.train import main
from fastlm.training.trainer import Callback


class CtrlCAfter(Callback):
    """Act as if Ctrl-C came right after optimizer step ``step`` (it is seen at the next step)."""

    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, step, loss):
        if step == self.step:
            trainer.request_stop(signal.SIGINT)


class Slow(Callback):
    def __init__(self, step_sleep: float, save_pause: float, fail_save_at: int = -1):
        self.step_sleep, self.save_pause, self.fail_save_at = step_sleep, save_pause, fail_save_at

    def on_step(self, trainer, step, loss):
        if self.step_sleep:
            time.sleep(self.step_sleep)

    def before_publish(self, trainer, folder):
        if self.save_pause:
            time.sleep(self.save_pause)
        if trainer.progress.step == self.fail_save_at:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))


if __name__ == "__main__":
    hooks = Slow(
        float(os.environ.get("HOOK_STEP_SLEEP", "0")),
        float(os.environ.get("HOOK_SAVE_PAUSE", "0")),
        int(os.environ.get("HOOK_FAIL_SAVE_AT", "-1")),
    )
    sys.exit(main(sys.argv[1:], callbacks=[hooks]))
