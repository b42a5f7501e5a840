"""Throughput of prepare + render on the embedded default scaled up (100k examples by default).

Runs the real stage functions in-process (files written included): prepare with
near-duplicate detection off and on, then render with the real tokenizer. Prints
examples/s against the 20k/s goal, and the render tokenization's speed against the
baseline measured in this same process: the tokenizer's own batched ``__call__`` on
the same texts, which is what render did before ``render.encode``.

    python benchmarks/prepare_render_throughput.py                  # 100k examples
    python benchmarks/prepare_render_throughput.py --smoke --base-model DIR   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere, against this checkout

from pipeline import prepare, render  # noqa: E402
from pipeline.config import from_mapping  # noqa: E402
from pipeline.files import read_jsonl  # noqa: E402
from pipeline.models import load_tokenizer  # noqa: E402
from pipeline.params import compose  # noqa: E402
from pipeline.prompts import make_template, segments  # noqa: E402

GOAL = 20_000  # examples/s, near-duplicate detection off


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def measure(n_per_task: int, base_model: Path, work: Path) -> dict[str, float]:
    cfg = from_mapping(compose([f"data.n_per_task={n_per_task}"]))
    n = 4 * n_per_task
    off = dataclasses.replace(cfg.data, dedup=dataclasses.replace(cfg.data.dedup, near="off"))
    on = dataclasses.replace(cfg.data, dedup=dataclasses.replace(cfg.data.dedup, near="report"))
    t_prep_off, _ = timed(prepare.run, off, cfg.seed, work / "prep_off", work / "stats_off.json")
    t_prep_on, _ = timed(prepare.run, on, cfg.seed, work / "prep_on", work / "stats_on.json")
    t_render, report = timed(render.run, cfg.prompt, work / "prep_off", base_model, work / "rendered",
                             work / "render.json")
    rendered = sum(r["rows"] for r in report["splits"].values())

    # Tokenization alone: render.encode against the tokenizer's own batched call.
    tokenizer = load_tokenizer(base_model)
    template = make_template(cfg.prompt, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    rows = read_jsonl(work / "prep_off" / "train.jsonl")
    t_segments, pieces = timed(lambda: [segments(r, template) for r in rows])
    texts = [p[0][0] for p in pieces]
    answers = [p[1][0] for p in pieces]
    t_base, base = timed(lambda: (tokenizer(texts)["input_ids"], tokenizer(answers, add_special_tokens=False)["input_ids"]))
    t_fast, fast = timed(lambda: (render.encode(tokenizer, texts, True), render.encode(tokenizer, answers, False)))
    assert fast == base, "render.encode must give the tokenizer's own ids"
    return {"examples": n, "rendered": rendered, "prepare_off_s": t_prep_off, "prepare_on_s": t_prep_on,
            "render_s": t_render, "train_rows": len(rows), "segments_s": t_segments,
            "tokenize_baseline_s": t_base, "tokenize_encode_s": t_fast}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-per-task", type=int, default=25_000, help="embedded examples per task (4 tasks)")
    parser.add_argument("--base-model", type=Path, default=REPO.parent / "main" / "models" / "base",
                        help="a checkpoint directory with the tokenizer (the base_model stage output)")
    parser.add_argument("--smoke", action="store_true", help="250 examples per task: checks the script runs")
    args = parser.parse_args(argv)
    n_per_task = 250 if args.smoke else args.n_per_task
    if not (args.base_model / "tokenizer.json").exists():
        print(f"no tokenizer in {args.base_model}: pass --base-model (e.g. models/base after `dvc repro base_model`)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        m = measure(n_per_task, args.base_model, Path(tmp))
    n = m["examples"]
    off = n / (m["prepare_off_s"] + m["render_s"])
    on = n / (m["prepare_on_s"] + m["render_s"])
    rows = m["train_rows"]
    print(f"examples: {n} ({m['rendered']} rendered)")
    print(f"prepare, near-dup off: {m['prepare_off_s']:.2f}s  ({n / m['prepare_off_s']:,.0f} ex/s)")
    print(f"prepare, near-dup on:  {m['prepare_on_s']:.2f}s  ({n / m['prepare_on_s']:,.0f} ex/s)")
    print(f"render:                {m['render_s']:.2f}s  ({n / m['render_s']:,.0f} ex/s)")
    print(f"prepare + render, near-dup off: {off:,.0f} ex/s  ({off / GOAL:.2f}x the {GOAL:,} ex/s goal)")
    print(f"prepare + render, near-dup on:  {on:,.0f} ex/s  ({on / GOAL:.2f}x the goal)")
    print(f"render parts on {rows} train rows: templates {rows / m['segments_s']:,.0f} ex/s; tokenization "
          f"{rows / m['tokenize_encode_s']:,.0f} ex/s vs {rows / m['tokenize_baseline_s']:,.0f} ex/s for the "
          f"tokenizer's own call ({m['tokenize_baseline_s'] / m['tokenize_encode_s']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
