"""Progress reporting that keeps log files readable.

On a terminal: a tqdm bar on stderr. When stderr is not a TTY (torchrun logs, CI, nohup): no carriage
returns, just one plain line every ``interval_s`` seconds and a final line, e.g.
``eval: 120/1000 (12.0%) 3.41 it/s elapsed 35s eta 4m18s | bpb=1.102``.
Disabled (e.g. non-zero ranks): iteration passes through and every method is a no-op.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")


def _fmt_dur(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class Progress:
    """Iterable wrapper with ``update`` / ``set_postfix`` / ``close``; see :func:`progress`."""

    def __init__(self, iterable: Iterable[Any] | None, total: int | None, desc: str, enabled: bool, file: TextIO,
                 interval_s: float, tty: bool, clock: Callable[[], float]):
        self._iterable = iterable
        self.total = total
        self.desc = desc
        self.n = 0
        self._file = file
        self._interval = interval_s
        self._clock = clock
        self._postfix = ""
        self._closed = False
        self._bar: Any | None = None
        self._plain = False
        if not enabled:
            return
        if tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, file=file, mininterval=0.5, dynamic_ncols=True, leave=True)
        else:
            self._plain = True
            self._t0 = clock()
            self._last = self._t0

    # -------------------------------------------------------------- plain-line mode
    def _line(self) -> str:
        elapsed = self._clock() - self._t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" if self.desc else f"{self.n}"]
        if self.total:
            parts[0] += f"/{self.total} ({100.0 * self.n / self.total:.1f}%)"
        parts.append(f"{rate:.3g} it/s" if rate else "")
        parts.append(f"elapsed {_fmt_dur(elapsed)}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {_fmt_dur((self.total - self.n) / rate)}")
        line = " ".join(p for p in parts if p)
        return f"{line} | {self._postfix}" if self._postfix else line

    def _emit(self) -> None:
        print(self._line(), file=self._file, flush=True)

    # -------------------------------------------------------------- public API
    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._plain and not self._closed:
            now = self._clock()
            if now - self._last >= self._interval:
                self._last = now
                self._emit()

    def set_postfix(self, **kwargs: Any) -> None:
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kwargs.items())
        self.set_postfix_str(text)

    def set_postfix_str(self, text: str) -> None:
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def write(self, msg: str) -> None:
        """Print a message without breaking the bar."""
        if self._bar is not None:
            self._bar.write(msg, file=self._file)
        else:
            print(msg, file=self._file, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._plain:
            self._emit()

    def __iter__(self) -> Iterator[Any]:
        if self._iterable is None:
            raise TypeError("this progress object counts a total; it has no iterable (call update())")
        try:
            for item in self._iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable_or_total: Iterable[T] | int, desc: str = "", enabled: bool = True, *, total: int | None = None,
             interval_s: float = 30.0, file: TextIO | None = None, tty: bool | None = None,
             clock: Callable[[], float] = time.monotonic) -> Progress:
    """Wrap an iterable (or count to an int total with ``update()``) with a log-friendly progress display.

    ``tty`` None → ``file.isatty()``; ``file`` defaults to stderr so stdout stays clean for results.
    """
    file = sys.stderr if file is None else file
    if isinstance(iterable_or_total, bool):
        raise TypeError("progress() needs an iterable or an int total, not a bool")
    if isinstance(iterable_or_total, int):
        iterable: Iterable[Any] | None = None
        total = iterable_or_total if total is None else total
    else:
        iterable = iterable_or_total
        if total is None:
            try:
                total = len(iterable_or_total)  # type: ignore[arg-type]
            except TypeError:
                total = None
    if tty is None:
        try:
            tty = bool(file.isatty())
        except (AttributeError, ValueError):
            tty = False
    return Progress(iterable, total, desc, enabled, file, interval_s, tty, clock)
