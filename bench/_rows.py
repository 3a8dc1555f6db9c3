"""Shared output of the energy benchmarks (decode_objective.py, model_error.py): one row per
(workload, setting, policy) with savings vs DistServe, P99 latencies and the SLO verdict."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def show(con: Console, title: str, setting: str, rows: list[dict[str, object]]) -> None:
    """Print ``rows`` as a table; ``setting`` is the key (and column) that varies besides the policy."""
    t = Table(title=title)
    for col in ("workload", setting, "policy", "saving P / D", "P99 TTFT s", "P99 TPOT ms", "SLO met"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["workload"]), str(r[setting]), str(r["policy"]),
                  f"{r['saving_prefill']:+.1%} / {r['saving_decode']:+.1%}", f"{r['ttft_p99_s']:.3f}",
                  f"{float(r['tpot_p99_s']) * 1e3:.1f}", "yes" if r["slo_met"] else "[red]NO[/red]")
    con.print(t)


def write(path: Path, rows: list[dict[str, object]], wall_s: float) -> None:
    path.write_text(json.dumps({"machine": platform.machine(), "python": sys.version.split()[0],
                                "wall_s": wall_s, "rows": rows}, indent=1) + "\n")
