"""Atomic writes: a failing writer leaves the previous file intact and no temporary file behind."""
from __future__ import annotations

import pytest

from metattt.atomic import atomic_path, atomic_write


def test_atomic_write_replaces_and_failure_keeps_old(tmp_path):
    target = tmp_path / "sub" / "f.json"
    atomic_write(target, "old")
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
