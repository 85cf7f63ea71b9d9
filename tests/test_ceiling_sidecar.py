"""A report regenerated where run directories were copied without their (large) artifacts: the digest the
training wrote beside the artifact stands in for it in the report, never in the runner's done check."""
from __future__ import annotations

from metattt.study.config import load_study
from metattt.study.runner import cell_done, model_done

from test_ceiling import study  # noqa: F401  (module fixture: one trained tiny model + one evaluated cell)


def test_recorded_digest_stands_in_for_an_absent_artifact_in_the_report_only(study) -> None:  # noqa: F811
    _, cfg = study
    st = load_study(cfg)
    c = st.cells()[0]
    art = st.artifact_path(c.model)
    side = art.with_name(art.name + ".sha256")
    assert side.is_file(), "training writes the artifact's sha256 beside it"
    saved = art.read_bytes()
    moved = art.with_name("moved.ptz")
    art.rename(moved)
    try:
        assert not cell_done(st, c) and not model_done(st, c.model)  # the runner needs the file itself
        assert cell_done(st, c, recorded=True) and model_done(st, c.model, recorded=True)
        digest = side.read_text()
        side.write_text("0" * 64 + "\n")  # a digest of another artifact: the cell is not this model's
        assert not cell_done(st, c, recorded=True)
        side.write_text(digest)
    finally:
        moved.rename(art)
    assert art.read_bytes() == saved and cell_done(st, c)
