"""SIGINT / SIGTERM for the command-line entry points: one line and exit 128 + signal number, never a traceback.

Two behaviours, both active only in the main thread and only inside their ``with`` block (the previous handlers come
back after it):

- :func:`sigterm_raises`: SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) where the program is, as
  SIGINT already does, so an entry point handles both in one ``except KeyboardInterrupt``.
- :class:`SignalFlag`: the same, except while armed: then SIGINT and SIGTERM only record the signal; the training
  loop arms it, reads it at each step boundary and checkpoints before it leaves (a signal mid-step must neither lose
  the run nor leave a half-updated state).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Any, Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception; ``signum`` says which signal (a plain KeyboardInterrupt is SIGINT)."""

    signum = int(signal.SIGTERM)


def signum_of(exc: BaseException) -> int:
    return int(getattr(exc, "signum", signal.SIGINT))


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    if not _main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class SignalFlag:
    """Inside ``with``: SIGINT / SIGTERM raise as :func:`sigterm_raises` makes them, except while ``armed``: then
    they only set ``signum`` (the first one received), for a loop that checks it at safe points."""

    def __init__(self) -> None:
        self.signum = 0
        self.armed = False
        self._old: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def _handle(self, signum, frame) -> None:
        if not self.armed:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self.signum = self.signum or int(signum)

    def __enter__(self) -> "SignalFlag":
        if _main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
