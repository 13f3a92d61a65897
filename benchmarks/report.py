"""Result types shared by the benchmarks, and their markdown / JSON rendering.

``python -m benchmarks.report A.json B.json ...`` prints one table for the results of
several runs (e.g. a full preset run one benchmark at a time with ``--only``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Comparison:
    """One side-by-side ratio: ``candidate`` against ``baseline`` on one metric.

    ``ratio`` is candidate/baseline when higher is better (throughput) and
    baseline/candidate when lower is better (time, memory, compute), so a ratio above
    1 always means the candidate wins. ``target`` is the ratio the project sets as
    its goal for that comparison (None: measured, no goal).
    """

    what: str
    baseline: str
    candidate: str
    metric: str
    baseline_value: float
    candidate_value: float
    higher_is_better: bool = True
    target: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        num, den = (self.candidate_value, self.baseline_value) if self.higher_is_better else (
            self.baseline_value, self.candidate_value)
        return float("inf") if den == 0 else num / den

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio >= self.target

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


@dataclass
class BenchResult:
    """What one benchmark measured: raw rows, the ratios, and plain-language notes."""

    benchmark: str
    preset: str
    params: dict
    rows: list[dict] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"benchmark": self.benchmark, "preset": self.preset, "params": self.params, "rows": self.rows,
                "comparisons": [c.to_dict() for c in self.comparisons], "notes": self.notes,
                "seconds": self.seconds}


def machine_info() -> dict:
    """Where the numbers came from: CPU count, platform and library versions."""
    import numpy
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numpy": numpy.__version__,
            "cuda": torch.cuda.is_available(), "date": time.strftime("%Y-%m-%d")}
    for name in ("ray", "faiss"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional in a given benchmark
            info[name] = None
    return info


def _fmt(value: float) -> str:
    if value == 0 or value != value:
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def markdown_table(results: list[BenchResult]) -> str:
    """One row per comparison: the two values, the ratio, the target and whether it was met."""
    lines = ["| benchmark | comparison | metric | baseline | candidate | ratio | target | met |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for c in res.comparisons:
            target = "" if c.target is None else f">= {c.target:g}x"
            met = "" if c.met is None else ("yes" if c.met else "**no**")
            lines.append(
                f"| {res.benchmark} | {c.what}: {c.candidate} vs {c.baseline} | {c.metric} | "
                f"{_fmt(c.baseline_value)} | {_fmt(c.candidate_value)} | {c.ratio:.2f}x | {target} | {met} |")
    return "\n".join(lines)


def write_json(results: list[BenchResult], path: Path, preset: str) -> None:
    """Write every result and the machine description to ``path`` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps({"preset": preset, "machine": machine_info(),
                               "results": [r.to_dict() for r in results]}, indent=2, default=float))
    tmp.replace(path)


def read_json(path: Path) -> tuple[dict, list[BenchResult]]:
    """The machine description and the results that ``write_json`` wrote to ``path``."""
    data = json.loads(Path(path).read_text())
    results = []
    for r in data["results"]:
        comparisons = [Comparison(**{k: v for k, v in c.items() if k not in ("ratio", "met")})
                       for c in r["comparisons"]]
        results.append(BenchResult(r["benchmark"], r["preset"], r["params"], r["rows"], comparisons, r["notes"],
                                   r["seconds"]))
    return data["machine"], results


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m benchmarks.report RESULTS.json [MORE.json ...]", file=sys.stderr)
        return 2
    results = []
    for path in argv:
        machine, produced = read_json(Path(path))
        print(f"- {path}: {', '.join(r.benchmark for r in produced)}; preset "
              f"{produced[0].preset if produced else '?'}, {machine['date']}, {machine['cpus']} CPU(s)")
        results += produced
    print()
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
