from __future__ import annotations

import io

import pytest

from metattt.track import progress


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_when_not_a_tty() -> None:
    out, clock = io.StringIO(), _Clock()
    seen = []
    for i in progress(range(10), "eval", file=out, interval_s=2.0, clock=clock):
        seen.append(i)
        clock.t += 1.0  # one item per second → a line every second item
    assert seen == list(range(10))
    text = out.getvalue()
    assert "\r" not in text, "no carriage returns in logs"
    lines = text.splitlines()
    assert lines[0] == "eval: 2/10 (20.0%) 1 it/s elapsed 2s eta 8s"
    assert lines[-1] == "eval: 10/10 (100.0%) 1 it/s elapsed 10s"
    assert len(lines) == 6  # at 2, 4, 6, 8, 10 items + the final line


def test_total_with_update_and_postfix() -> None:
    out, clock = io.StringIO(), _Clock()
    with progress(1000, "ttt", file=out, interval_s=60.0, clock=clock) as bar:
        clock.t += 125.0
        bar.update(250)
        bar.set_postfix(bpb=1.23456, chunk=3)
    # rate 250 / 125 s = 2 it/s; eta 750 / 2 = 375 s; the postfix was set after the first line.
    assert out.getvalue().splitlines() == [
        "ttt: 250/1000 (25.0%) 2 it/s elapsed 2m05s eta 6m15s",
        "ttt: 250/1000 (25.0%) 2 it/s elapsed 2m05s eta 6m15s | bpb=1.235, chunk=3",
    ]


def test_disabled_is_silent_passthrough() -> None:
    out = io.StringIO()
    assert list(progress(iter("abc"), "x", enabled=False, file=out)) == ["a", "b", "c"]
    bar = progress(5, "x", enabled=False, file=out)
    bar.update(5)
    bar.close()
    assert out.getvalue() == ""
    with pytest.raises(TypeError):
        list(progress(5, "x", file=out))
