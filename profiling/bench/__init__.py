"""The serving benchmarks — the other wing of ``profiling/``, apart from the measurement tools (profile, eval,
report): load generation against any OpenAI-compatible server (``bench-serve``), this project's three generation
paths side by side (:mod:`.local`), and the decode step alone (``bench-decode``).

:mod:`.workload` builds the requests, :mod:`.http_load` sends them and times them from the client,
:mod:`.results` summarises and renders the rows (one percentile definition: :func:`profiling.stats.percentile`).
"""
