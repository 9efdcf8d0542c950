"""SIGINT (Ctrl-C) and SIGTERM during a fine-tune (DESIGN.md, "Interrupts and checkpoints").

While :class:`Interrupts` is entered, the two signals no longer raise ``KeyboardInterrupt`` or kill
the process. Inside :meth:`Interrupts.deferred` (an optimizer step, a checkpoint save, the set-up of
the output directory) a signal is only recorded: the run finishes the step, saves a checkpoint and
raises :class:`Interrupted`, which the command turns into one line and exit 130 (SIGINT) or 143
(SIGTERM). Outside it (set-up, model loading, the evaluations) there is nothing to finish, and the
signal raises :class:`Stop` at once. The same signal a second time always raises :class:`Stop` at
once (under torchrun, not within ``repeat_window`` seconds of the first: the agent forwards the
terminal's Ctrl-C to workers that received it too): a save it cuts short never becomes the newest
checkpoint (``checkpoint.save`` writes a temporary directory, renamed into place once its manifest is
written).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from .errors import CommandError

__all__ = ["Interrupted", "Interrupts", "Stop", "SIGNALS", "REPEAT_WINDOW", "interrupted"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(CommandError):
    """The run stopped on a signal; ``exit_code`` is the shell's ``128 + signal number`` (130 for
    SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class Stop(BaseException):
    """Raised by the handler to stop at once; a ``BaseException`` like ``KeyboardInterrupt``, so that no
    ``except Exception`` on the way swallows it. ``finetune`` turns it into :class:`Interrupted`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupts:
    """The run's handlers for :data:`SIGNALS` while entered (only in the main thread: Python delivers
    signals there; elsewhere nothing is installed and the signals keep their behaviour)."""

    def __init__(self, repeat_window: float = 0.0) -> None:
        self.signum: int | None = None  # the first signal received
        #: a repeat within this many seconds of the first is the same request (torchrun's agent
        #: forwards the terminal's Ctrl-C to its workers, which received it themselves too)
        self.repeat_window = repeat_window
        self._first_at = 0.0
        self._deferring = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        import os
        import time

        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            if self._deferring:
                # os.write, not print: the handler may run while the main thread is inside a print
                os.write(2, f"\n{signal.Signals(signum).name} received: finishing the step and saving a checkpoint "
                            "(the same signal again stops at once)\n".encode())
                return
        elif signum != self.signum or time.monotonic() - self._first_at < self.repeat_window:
            return  # e.g. torchrun's SIGTERM after the terminal's SIGINT: the same request, already under way
        raise Stop(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal received inside waits for the block to end (see the module docstring)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def defer(self, on: bool) -> None:
        """Signals wait (``on``) until :meth:`defer` ``(False)``: the training loop's form of :meth:`deferred`,
        which checks :attr:`requested` after each step."""
        self._deferring += 1 if on else -1


#: under torchrun, a repeated signal within this many seconds is the same request (``interrupts.Interrupts``)
REPEAT_WINDOW = 5.0


def interrupted(run: Any, signum: int, at_once: bool = False) -> Interrupted:
    """The one line a run stopped by signal ``signum`` ends with; ``run``: the ``preflight.Run`` (None
    before set-up gave one); ``at_once``: stopped without finishing the step."""
    if run is None or not run.started:
        return Interrupted("interrupted before training began; nothing was written", signum)
    resume = f"galore-plus finetune --resume {run.out}" + (" (under torchrun, as the run was)"
                                                           if run.runtime.is_distributed else "")
    if not run.config.save_checkpoint:
        return Interrupted(f"interrupted at step {run.step}; the run writes no checkpoint (--no-save-checkpoint), so "
                           "it cannot be resumed", signum)
    if at_once and run.step != (run.saved_step or 0):
        return Interrupted(f"interrupted at step {run.step} at once (a second signal): the steps after the checkpoint "
                           f"of step {run.saved_step or 0} are trained again; resume with: {resume}", signum)
    return Interrupted(f"interrupted at step {run.saved_step or 0}; resume with: {resume}", signum)
