"""The ceiling study (issue 18): models × evaluator settings as resumable cells, and the report they produce.

``config`` (TOML → typed specs, grid expansion, cell keys), ``runner`` (train / evaluate what is missing),
``report`` (markdown sections between markers; ``markdown``: its cells and tables, read back by tests), ``ladder``
and ``arms`` (the ladder and meta-training sections), ``plots`` (small PNGs).
"""
