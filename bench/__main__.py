"""``python -m bench [section ...]``: run the benchmarks, print one table, write it to bench/RESULTS.md.

Every figure is a ratio against a baseline measured side by side in the same run, with both
absolute numbers beside it; these machines are noisy, so only ratios are compared.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from . import bigproject, bodies, churn, fleet, interactive, orchestrator_ready, ray_failover, serving, soak
from .common import Table

SECTIONS = {
    "serving": serving.run,
    "bodies": bodies.run,
    "churn": churn.run,
    "handoff": serving.run_hand_off,
    "big": bigproject.run,
    "bigproject": bigproject.run_push,
    "orchestrator": orchestrator_ready.run,
    "ray": ray_failover.run,
    "soak": soak.run,
    "fleet": fleet.run,
    "interactive": interactive.run,
}


def main(argv: list[str]) -> int:
    # serving runs the hand-off rows too; the soak (10 minutes), the real Label Studio's big project (4) and the
    # hundred-model fleet (10) when asked for
    chosen = argv or [name for name in SECTIONS if name not in ("handoff", "soak", "bigproject", "fleet")]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    table = Table()
    started = time.time()
    for name in chosen:
        print(f"{name} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as workdir:
            SECTIONS[name](table, Path(workdir))
    header = (
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {time.time() - started:.0f} s in all. Sections: {', '.join(chosen)}."
    )
    text = f"{header}\n\n{table.markdown()}\n"
    print("\n" + text)
    (Path(__file__).parent / "RESULTS.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
