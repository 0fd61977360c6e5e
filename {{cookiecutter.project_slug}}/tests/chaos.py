"""A callback that kills its own run at an exact moment, for the resume tests (tests/test_chaos.py).

Given on the command line of `train.py`, e.g.
    --trainer.callbacks+='{"class_path": "chaos.KillAt", "init_args": {"signal": "SIGKILL", "step": 6}}'
it sends the signal to its own process when the hook runs at that global step: a moment fixed by
the run itself, not by how fast the machine is.
"""

import os
import signal as signals

import lightning as L

HOOKS = ("on_train_batch_start", "on_validation_batch_start", "on_validation_end")


class KillAt(L.Callback):
    def __init__(self, signal: str, step: int, hook: str = "on_train_batch_start", times: int = 1):
        """
        Args:
            signal: SIGKILL, SIGTERM or SIGINT.
            step: the global step at which the hook fires it (sanity-check validation never does).
            hook: on_train_batch_start, on_validation_batch_start or on_validation_end (after the
                validation's row is written and before a save that waited for it).
            times: how often it is sent at once (2 x SIGINT: a second Ctrl-C).
        """
        if hook not in HOOKS:
            raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")
        self.signal, self.step, self.hook, self.times = getattr(signals, signal), step, hook, times
        self.fired = False

    def _fire(self, trainer: L.Trainer) -> None:
        if self.fired or trainer.sanity_checking or trainer.global_step != self.step:
            return
        self.fired = True
        for _ in range(self.times):
            os.kill(os.getpid(), self.signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.hook == "on_train_batch_start":
            self._fire(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.hook == "on_validation_batch_start":
            self._fire(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.hook == "on_validation_end":
            self._fire(trainer)
