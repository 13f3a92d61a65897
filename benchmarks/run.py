"""Run the benchmark suite: ``python -m benchmarks.run [--preset small] [--only a,b]``.

Prints a markdown table of side-by-side ratios and writes every measurement as JSON.
Presets: ``ci`` (minutes; proves the scripts work, numbers mean little), ``small``
(about 11 minutes on 2 cores) and ``full`` (the sizes of the full-scale target: 1M
queries x 50k references x 128 dims; 1 h 34 min on 2 cores, the README table).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import BenchResult, machine_info, markdown_table, write_json

# Order matters only for reading the table: cheapest first.
BENCHMARKS = ("neighbours", "embedding", "training_step", "scaling", "streaming", "end_to_end")
PRESET_NAMES = ("ci", "small", "full")


def check_choice(preset: str, only: list[str] | None) -> list[str]:
    """The benchmarks to run; a ValueError names an unknown preset or benchmark."""
    names = list(BENCHMARKS) if not only else only
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; allowed: {', '.join(BENCHMARKS)}")
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESET_NAMES)}")
    return names


def run_suite(preset: str, only: list[str] | None = None, workdir: Path | None = None,
              kinds: list[str] | None = None) -> list[BenchResult]:
    """Run the chosen benchmarks in order and return their results; ``kinds``: end_to_end's pool kinds."""
    names = check_choice(preset, only)
    results = []
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)  # a scratch parent the user named; only its temp child is removed
    with tempfile.TemporaryDirectory(prefix="rayprune-bench-", dir=workdir) as tmp:
        for name in names:
            module = importlib.import_module(f"benchmarks.{name}")
            logging.getLogger(__name__).info("benchmark %s (preset %s)", name, preset)
            start = time.perf_counter()
            sub = Path(tmp) / name
            sub.mkdir()
            extra = {"kinds": kinds} if kinds and name == "end_to_end" else {}
            produced = module.run(preset, sub, **extra)  # one result, or several sharing the same runs
            produced = produced if isinstance(produced, list) else [produced]
            for result in produced:
                result.seconds = time.perf_counter() - start
            results.extend(produced)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=PRESET_NAMES)
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", default="benchmarks/results/latest.json", help="where to write the results")
    parser.add_argument("--workdir", help="scratch directory for pools and outputs (default: system temp)")
    parser.add_argument("--kinds", help="end_to_end: comma-separated kinds of generated pool to run, the first also "
                        "paid off (default: every kind of the preset)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    try:
        check_choice(args.preset, only)
        if kinds:
            from benchmarks.end_to_end import check_kinds

            check_kinds(args.preset, kinds)
    except ValueError as exc:
        parser.error(str(exc))
    results = run_suite(args.preset, only, Path(args.workdir) if args.workdir else None, kinds)
    write_json(results, Path(args.json), args.preset)
    machine = machine_info()
    print(f"\nrayprune benchmarks, preset {args.preset}, on {machine['cpus']} CPU(s), {machine['platform']}, "
          f"torch {machine['torch']}, ray {machine['ray']}\n")
    print(markdown_table(results))
    for res in results:
        for note in res.notes:
            print(f"- {res.benchmark}: {note}")
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
