"""The ceiling study (issue 18): models × evaluator settings as resumable cells, and the report they produce.

``config`` (TOML → typed specs, grid expansion, cell keys), ``runner`` (train / evaluate what is missing),
``report`` (markdown sections between markers, read back by tests), ``plots`` (small PNGs).
"""
