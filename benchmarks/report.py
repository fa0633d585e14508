"""Summarise ``fastconv bench --json`` output as one compact markdown table.

    python benchmarks/report.py bench.json            # one row per (op, shape)

Each cell is ``time / torch`` (below 1: faster than PyTorch) for one backend, with its GFLOP/s
(GB/s for pools); the last columns give PyTorch's own rate and the best backend's multiple over the
naive loops. The full per-group tables are what ``fastconv bench`` prints.
"""

from __future__ import annotations

import json
import sys


def summary(record: dict) -> str:
    results = record["results"]
    groups = {}
    for r in results:
        groups.setdefault((r["op"], r["shape"]), {})[r["contender"]] = r
    backends = [c for c in dict.fromkeys(r["contender"] for r in results)
                if c not in ("naive", "torch")]
    head = ["op", "shape", *[f"{b}: time/torch (rate)" for b in backends], "torch rate",
            "best × naive"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for (op, shape), g in groups.items():
        unit = "GB/s" if op.startswith("pool") else "GFLOP/s"
        cells = [op, shape]
        for b in backends:
            r = g.get(b)
            if r is None:
                cells.append("–")
                continue
            rate = r["gbps"] if r["gbps"] is not None else r["gflops"]
            ratio = "–" if r["vs_torch"] is None else f"{r['vs_torch']:.2f}"
            cells.append(f"{ratio} ({rate:.3g})")
        t = g.get("torch")
        cells.append("–" if t is None else
                     f"{(t['gbps'] if t['gbps'] is not None else t['gflops']):.3g} {unit}")
        multiples = [g[b]["x_naive"] for b in backends if b in g and g[b]["x_naive"]]
        cells.append(f"{max(multiples):,.0f}×" if multiples else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(summary(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
