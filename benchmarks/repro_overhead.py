"""Fixed costs a user pays on every command: `python -m pipeline.<stage> --help` and a no-op `dvc repro`.

`--help` must not import torch, transformers, lightning, peft or mlflow (stage modules keep
them inside functions). The `dvc repro` figure is only a no-op where the repo's outputs are
up to date (`dvc status` clean); elsewhere the script says so and times `dvc repro --dry`.

    python benchmarks/repro_overhead.py [--repo DIR]     # all stages + dvc
    python benchmarks/repro_overhead.py --smoke          # the train stage's --help only
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("base_model", "prepare", "render", "train", "evaluate")
HEAVY = ("torch", "transformers", "lightning", "peft", "mlflow")
PROBE = """
import runpy, sys
sys.argv = ["{stage}", "--help"]
try:
    runpy.run_module("pipeline.{stage}", run_name="__main__")
except SystemExit:
    pass
print("HEAVY", ",".join(m for m in {heavy!r} if m in sys.modules))
"""


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT, help="DVC repo for the no-op repro")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    heavy_seen: set[str] = set()
    for stage in ("train",) if args.smoke else STAGES:
        seconds, out = timed([sys.executable, "-c", PROBE.format(stage=stage, heavy=HEAVY)], ROOT)
        line = [x for x in out.splitlines() if x.startswith("HEAVY")]
        heavy = set(filter(None, line[-1].removeprefix("HEAVY ").split(","))) if line else {"<probe failed>"}
        heavy_seen |= heavy
        print(f"python -m pipeline.{stage} --help: {seconds:.2f} s" + (f" (imports {sorted(heavy)})" if heavy else ""))
    print(f"heavy modules imported by --help: {', '.join(sorted(heavy_seen)) or 'none'}")
    if args.smoke or shutil.which("dvc") is None:
        return 0
    seconds, out = timed(["dvc", "status", "--json"], args.repo)
    clean = out.strip() == "{}"  # anything else (changes, or an error) must not start a real repro
    print(f"dvc status: {seconds:.2f} s ({'up to date' if clean else 'NOT up to date'})")
    seconds, out = timed(["dvc", "repro"] if clean else ["dvc", "repro", "--dry"], args.repo)
    print(f"dvc repro{'' if clean else ' --dry'} (no-op): {seconds:.2f} s (goal <= 3 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
