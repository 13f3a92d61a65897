"""Side-by-side performance benchmarks (run with ``python -m benchmarks.run``).

Each benchmark module exposes ``PRESETS`` (preset name -> parameters) and
``run(preset: str, workdir: pathlib.Path) -> report.BenchResult``. Compared variants
run in the same process and the same run, so ratios are meaningful on a noisy machine
even when absolute times are not.
"""
