"""What the logs that send a run to a tracking service (MLflow, Weights & Biases) share: a send that fails is
said the first time and counted, and the training goes on; the run directory holds every number anyway.

A log whose client sends while the caller waits (MLflow's) sends from a thread of its own (`in_background`), in
order, so that the training never waits on the server: MLflow's client retries a server that does not answer for
about four minutes before it gives up, and the training sends twice a second. A send that fails is let go and the
next one tried, so a server back after an outage gets the rest. At the end the sends still waiting are made
while the server answers: where none has come back for CLOSE_PATIENCE seconds and the server takes no connection
(`reachable`), or none for SEND_PATIENCE seconds however it looks (a large model file on a slow link takes
minutes), those left are counted as lost. The HTTP library's line for each of its retries from that thread
(urllib3's "Retrying (Retry(total=6 ...", about 300 characters each, seven a send) becomes one line an outage.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

CLOSE_PATIENCE = 60.0  # seconds the end of a run waits on a send, before asking whether the server is there
SEND_PATIENCE = 600.0  # seconds it waits on one send at most, the server there or not


class RemoteLog:
    def __init__(self, flag: str, run_dir: Path, warn: Callable[[str], None], in_background: bool = False,
                 reachable: Callable[[], bool] = lambda: True):
        """`reachable`: whether the server takes connections now (asked where a send at the end is slow)."""
        self.flag, self.run_dir, self.warn, self.lost = flag, run_dir, warn, 0
        self.reachable = reachable
        self.where = ""  # the service, as messages name it; set once it is known
        self._changed: threading.Condition | None = None  # with in_background: the sends waiting changed
        self._waiting: deque[tuple[Callable[[], object], str]] = deque()  # the first: being sent
        self._closing = self._given_up = False
        self._sender: threading.Thread | None = None  # started with the first send
        self._retrying = False  # the sender's HTTP library is retrying a send, and that has been said
        if in_background:
            self._changed = threading.Condition()

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
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_in_order, name=f"{self.flag} sends", daemon=True)
                logging.getLogger("urllib3.connectionpool").addFilter(self._retries_said_once)
                self._sender.start()

    def _retries_said_once(self, record: logging.LogRecord) -> bool:
        """urllib3's log filter: its retries from this log's sender say one line an outage (until a send goes
        through); every other record passes."""
        if threading.current_thread() is not self._sender or not record.getMessage().startswith("Retrying"):
            return True
        if not self._retrying:
            self._retrying = True
            reason = re.search(r"\[Errno -?\d+\] ([^\"')]+)", record.getMessage())
            self.warn(f"{self.flag}: {self.where} does not answer" + (f" ({reason[1]})" if reason else "")
                      + "; its client tries again in the background, and training goes on")
        return False

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
                self._retrying = self._retrying and error is not None  # through: the next outage is said again
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
        """Wait for the sends still waiting, while the server answers: where one is not done after CLOSE_PATIENCE
        seconds and the server takes no connection, or after SEND_PATIENCE seconds, those left are counted as
        lost and not waited on (the thread that sends is let go)."""
        if self._changed is None:
            return
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            while self._waiting:
                left, waited = len(self._waiting), 0.0
                while not self._changed.wait_for(lambda: len(self._waiting) < left, timeout=CLOSE_PATIENCE):
                    waited += CLOSE_PATIENCE
                    there = waited < SEND_PATIENCE and self.reachable()
                    if not there:
                        self._given_up = True
                        self.lost += left
                        why = "" if waited >= SEND_PATIENCE else " and takes no connection"
                        self.warn(f"{self.flag}: {self.where} has not answered for {waited:g} s{why}; the {left} "
                                  f"send(s) left are not made")
                        return  # the filter stays: the sender, let go, may still be retrying
        logging.getLogger("urllib3.connectionpool").removeFilter(self._retries_said_once)

    def _say_lost(self) -> None:
        if self.lost:
            self.warn(f"{self.flag}: {self.lost} of the run's sends to {self.where} failed; the run directory "
                      f"{self.run_dir} holds everything")


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
