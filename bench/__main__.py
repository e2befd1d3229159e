"""Run the benchmarks: `python -m bench [--only NAME]`.

Each `bench/bench_*.py` module exposes `run() -> list[dict]`; every record is
`{"name", "ours", "baseline", "unit", "ratio", "target", "notes"}`, measured in one
run, with ratio > 1 meaning ours is better. The table is printed and the records are
written to var/bench/results.json. Benchmarks never gate CI: they report.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = Path("var/bench/results.json")


def modules() -> list[str]:
    """Names of the benchmark modules, e.g. 'bench_iou_tally'."""
    return sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--only", help="a record name or module name (iou_tally, bench_iou_tally)")
    args = parser.parse_args()
    chosen = [m for m in modules() if not args.only or args.only in (m, m.removeprefix("bench_"))]
    records: list[dict[str, Any]] = []
    for name in chosen or modules():
        started = time.monotonic()
        module = importlib.import_module(f"bench.{name}")
        got = module.run()
        if args.only and chosen == []:
            got = [r for r in got if r["name"] == args.only]
        for record in got:
            record.setdefault("notes", "")
            records.append(record)
        print(f"[{name}: {time.monotonic() - started:.0f}s]", flush=True)
    if args.only and not records:
        raise SystemExit(f"no benchmark named {args.only!r}; have: {', '.join(modules())}")
    header = f"{'name':<24}{'ours':>14}{'baseline':>14}  {'unit':<12}{'ratio':>9}{'target':>8}  ok"
    print(header)
    print("-" * len(header))
    for r in records:
        ok = "yes" if r["ratio"] >= r["target"] else "no"
        print(
            f"{r['name']:<24}{r['ours']:>14.4g}{r['baseline']:>14.4g}  {r['unit']:<12}"
            f"{r['ratio']:>9.2f}{r['target']:>8.2f}  {ok}"
        )
        if r["notes"]:
            print(f"    {r['notes']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(records, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
