"""Ctrl-C and SIGTERM during training: finish the step, save, and exit, instead of losing the run.

The first SIGINT or SIGTERM only sets a flag; the trainer looks at it after each optimizer step and stops there,
saving a step checkpoint (and the state with --save_state), and exits with 130. A second one aborts at once, as
Ctrl-C usually does. Both signals are handled alike because MindSpore's runtime turns a Ctrl-C that arrives while a
graph runs into a SIGTERM (measured, MindSpore 2.10), so the two cannot be told apart. Under msrun every rank must
stop after the same step (the next all-reduce would hang otherwise), so the ranks agree on the flag each step.
"""

import signal
import sys
import threading

from library import distributed

EXIT_CODE = 130  # a shell's code for Ctrl-C (128 + SIGINT)


class StopRequest:
    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a trainer run elsewhere keeps the defaults
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: stopping after this step and saving (Ctrl-C again to abort now)",
              file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether to stop now; a collective under msrun (every rank calls it after every step)."""
        if distributed.get_state().world_size == 1:
            return self.signal_name is not None
        names = [name for name in distributed.gather_json(self.signal_name) if name]
        if names and self.signal_name is None:
            self.signal_name = names[0]
        return bool(names)
