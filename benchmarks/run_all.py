"""Run every benchmark side by side and print the floors; results in benchmarks/results/*.json.

    python benchmarks/run_all.py          # minutes; the end-to-end part uses the quick profile
    python benchmarks/run_all.py --full   # also times the full demo (~10 min)
    python benchmarks/bench_scale.py      # memory and speed at 10k / 100k / 1M images (~30 min, ~4 GB disk; not in run_all)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_captions  # noqa: E402
import bench_data  # noqa: E402
import bench_e2e  # noqa: E402
import bench_generation  # noqa: E402
import bench_loss  # noqa: E402
import bench_training  # noqa: E402


def main() -> None:
    results = {"loss": bench_loss.main(), "generation": bench_generation.main()}
    with tempfile.TemporaryDirectory(prefix="synrep-bench-") as tmp:
        shards = bench_data.make_shards(Path(tmp))
        results["data"] = bench_data.main(shards)
        results["training"] = bench_training.main(shards)
    results["captions"] = bench_captions.main()
    results["e2e"] = bench_e2e.main(full="--full" in sys.argv)
    print("\n== floors ==")
    gen = results["generation"]["ratios"]
    print(f"batched generation >= 1.3x reference: {', '.join(f'{k}: {v:.2f}' for k, v in gen.items())}")
    print(f"training >= 0.9x bare loop: {', '.join(f'{k}: {v:.2f}' for k, v in results['training']['ratios'].items())}")
    print(f"loader (2 workers) >= 3x training consumption: {results['data']['ratios']['loader / training consumption']:.1f}")
    print(f"end to end: {results['e2e']['ratios']['minutes']:.1f} min")


if __name__ == "__main__":
    main()
