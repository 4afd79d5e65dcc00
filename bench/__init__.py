"""fusedopt benchmarks: shape lists, byte counts, timing, torch peers and the report.

The main job is ``python -m bench.report`` (see ``bench/report.py``); microbenchmarks live in
``bench/test_microbench.py`` (``pytest bench/test_microbench.py``).
"""
