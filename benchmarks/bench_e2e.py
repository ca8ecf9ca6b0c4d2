"""End to end: wall time per stage and peak memory of `synrep run` (the quick profile, or --full for the demo)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report


def main(full: bool = False) -> dict:
    out = Path(tempfile.mkdtemp(prefix="synrep-bench-e2e-")) / "run"
    # The child reports its own peak resident memory (ru_maxrss, KiB on Linux) when the run ends.
    child = ("import resource, sys; from synrep.cli import main; rc = main(sys.argv[1:]); "
             "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    cmd = [sys.executable, "-c", child, "run", *([] if full else ["--quick"]), f"out_dir={out}"]
    start = time.perf_counter()
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_mb = int(result.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) / 1024
    timings = json.loads((out / "timings.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    rows = [{"stage": k, "seconds": float(v)} for k, v in timings.items()] + [{"stage": "total (incl. start-up, report)", "seconds": wall}]
    result = report("e2e_full" if full else "e2e_quick", rows, {"peak memory (MB)": peak_mb, "minutes": wall / 60})
    print("linear top-1:", summary["linear_top1"])
    return result


if __name__ == "__main__":
    main(full="--full" in sys.argv)
