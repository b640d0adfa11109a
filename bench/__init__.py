"""Benchmarks that show the trade-offs against the performance goals of docs/DESIGN.md
("Performance goals"): evidence kept, cost per group, memory, time to answer, sustained
ingest. `python -m bench.run_all` (or `make bench`) runs them all and writes
`bench/results/*.md` and PNG plots; each module also runs alone (`python -m bench.recall`).

Not a test suite: speed and memory goals are reported as met or missed with the measured
figure, never asserted. tests/test_bench_smoke.py runs every benchmark at toy sizes.
"""
