"""What the logs that send a run to a tracking service (MLflow, Weights & Biases) share: a send that fails is
said the first time and counted, and the training goes on; the run directory holds every number anyway.

A log whose client sends while the caller waits (MLflow's) sends from a thread of its own (`in_background`), in
order, so that the training never waits on the server: MLflow's client retries a server that does not answer for
about four minutes before it gives up, and the training sends twice a second. A send that fails is let go and the
next one tried, so a server back after an outage gets the rest. At the end the sends still waiting are made
while the server answers; where none has come back for CLOSE_PATIENCE seconds, those left are counted as lost.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

CLOSE_PATIENCE = 60.0  # seconds the end of a run waits on a server that has stopped answering


class RemoteLog:
    def __init__(self, flag: str, run_dir: Path, warn: Callable[[str], None], in_background: bool = False):
        self.flag, self.run_dir, self.warn, self.lost = flag, run_dir, warn, 0
        self.where = ""  # the service, as messages name it; set once it is known
        self._changed: threading.Condition | None = None  # with in_background: the sends waiting changed
        self._waiting: deque[tuple[Callable[[], object], str]] = deque()  # the first: being sent
        self._closing = self._given_up = False
        if in_background:
            self._changed = threading.Condition()
            threading.Thread(target=self._send_in_order, name=f"{flag} sends", daemon=True).start()

    def _call(self, send: Callable[[], object], what: str) -> None:
        """Send `what` (in the background where the log sends there); where it fails, say so the first time and go
        on: the training matters more than its log. `send` runs later in the background: it must hold its own
        values (functools.partial), not a loop's variables."""
        if self._changed is None:
            self._count(self._sent(send), what)
            return
        with self._changed:
            self._waiting.append((send, what))
            self._changed.notify_all()

    def _send_in_order(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._closing)
                if not self._waiting:
                    return
                send, what = self._waiting[0]
            error = self._sent(send)
            with self._changed:
                if self._given_up:  # counted as lost already
                    return
                self._count(error, what)
                self._waiting.popleft()
                self._changed.notify_all()

    @staticmethod
    def _sent(send: Callable[[], object]) -> Exception | None:
        try:
            send()
        except Exception as error:  # the service's errors and a lost connection alike
            return error
        return None

    def _count(self, error: Exception | None, what: str) -> None:
        if error is None:
            return
        self.lost += 1
        if self.lost == 1:
            self.warn(f"{self.flag}: sending {what} to {self.where} failed ({first_line(error)}); training goes on, "
                      f"and the run directory keeps every number")

    def send_the_rest(self) -> None:
        """Wait for the sends still waiting, while the server answers: where none is done for CLOSE_PATIENCE
        seconds, those left are counted as lost and not waited on (the thread that sends is let go)."""
        if self._changed is None:
            return
        patience = CLOSE_PATIENCE
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            while self._waiting:
                left = len(self._waiting)
                if not self._changed.wait_for(lambda: len(self._waiting) < left, timeout=patience):
                    self._given_up = True
                    self.lost += left
                    self.warn(f"{self.flag}: {self.where} has not answered for {patience:g} s; the {left} send(s) "
                              f"left are not made")
                    return

    def _say_lost(self) -> None:
        if self.lost:
            self.warn(f"{self.flag}: {self.lost} of the run's sends to {self.where} failed; the run directory "
                      f"{self.run_dir} holds everything")


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
