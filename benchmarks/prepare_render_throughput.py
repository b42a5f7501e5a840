"""Throughput of prepare + render on the embedded default scaled up (100k examples by default).

Runs the real stage functions in-process (files written included), as the DVC stages
run them: prepare with the default safety rules and near-duplicate detection off and
on, then render with the real tokenizer (in ``pipeline.core.parallel.workers()`` processes), in
``--repeat`` rounds (3; each round's times are printed, and a shared machine's slow moment
moves the median less than one run). Prints examples/s from the medians against the 20k/s
goal; then, redone in one process for reference, render's
parts (loading the tokenizer in a fresh process, reading, templates, tokenization) and
its tokenization against the baselines measured in this same process on the same
texts: the tokenizer's own batched ``__call__`` and ``pieces.encode`` (whole texts, each
distinct text once); ``pieces.PieceEncoder`` is what render uses.

    python benchmarks/prepare_render_throughput.py                  # 100k examples
    python benchmarks/prepare_render_throughput.py --smoke --base-model DIR   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere, against this checkout

from pipeline import prepare, render
from pipeline.core import parallel
from pipeline.core.config import from_mapping  # noqa: E402
from pipeline.core.files import read_jsonl  # noqa: E402
from pipeline.core.models import load_tokenizer  # noqa: E402
from pipeline.params import compose  # noqa: E402
from pipeline.prompting.templates import make_template, segments  # noqa: E402
from pipeline.prompting import pieces as piece_encoding  # noqa: E402
from pipeline.prompting.shots import ShotPool  # noqa: E402

GOAL = 20_000  # examples/s, near-duplicate detection off


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def measure(n_per_task: int, base_model: Path, work: Path, repeat: int = 1) -> dict[str, Any]:
    cfg = from_mapping(compose([f"data.n_per_task={n_per_task}"]))
    n = 4 * n_per_task
    off = dataclasses.replace(cfg.data, dedup=dataclasses.replace(cfg.data.dedup, near="off"))
    on = dataclasses.replace(cfg.data, dedup=dataclasses.replace(cfg.data.dedup, near="report"))
    runs: dict[str, list[float]] = {"prepare_off_s": [], "prepare_on_s": [], "render_s": []}
    for _ in range(repeat):  # rounds of the three timed parts; the median of each is reported
        runs["prepare_off_s"].append(timed(prepare.run, dataclasses.replace(cfg, data=off),
                                           prepare.Paths(work / "prep_off", work / "stats_off.json"))[0])
        runs["prepare_on_s"].append(timed(prepare.run, dataclasses.replace(cfg, data=on),
                                          prepare.Paths(work / "prep_on", work / "stats_on.json"))[0])
        t_render, report = timed(render.run, cfg, render.Paths(work / "prep_off", base_model, work / "rendered",
                                                               work / "render.json"))
        runs["render_s"].append(t_render)
    rendered = sum(r["rows"] for r in report["splits"].values())
    t_prep_off, t_prep_on, t_render = (statistics.median(runs[k]) for k in runs)

    # Render's parts, redone on the same data: what a fresh process pays to load the tokenizer
    # (importing transformers and torch), reading, templates (k-shot arm included), tokenization.
    t_load = load_seconds(base_model)
    tokenizer = load_tokenizer(base_model)
    template = make_template(cfg.prompt, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    t_read, splits = timed(lambda: {s: read_jsonl(work / "prep_off" / f"{s}.jsonl") for s in render.SPLITS})
    kshot = dataclasses.replace(template, k_shot=cfg.prompt.eval_k_shot)
    t_segments, pieces = timed(lambda: [segments(r, template) for rows in splits.values() for r in rows] + (
        [segments(r, kshot, pool.draw(r, kshot.k_shot, kshot.shot_seed))
         for pool in [ShotPool(splits["train"])] for r in splits["test"]] if kshot.k_shot else []))
    first = [p[0][0] for p in pieces]
    rest = [t for p in pieces for t, _ in p[1:]]
    t_pieces, fast = timed(lambda: (lambda enc: (enc(first, True), enc(rest, False)))(piece_encoding.PieceEncoder(tokenizer)))
    t_whole, whole = timed(lambda: (piece_encoding.encode(tokenizer, first, True), piece_encoding.encode(tokenizer, rest, False)))
    t_base, base = timed(lambda: (tokenizer(first)["input_ids"],
                                  tokenizer(rest, add_special_tokens=False)["input_ids"]))
    assert fast == whole == base, "render's encoders must give the tokenizer's own ids"
    return {"examples": n, "rendered": rendered, "prepare_off_s": t_prep_off, "prepare_on_s": t_prep_on,
            "render_s": t_render, "runs": runs, "texts": len(pieces), "load_s": t_load, "read_s": t_read,
            "segments_s": t_segments, "tokenize_baseline_s": t_base, "tokenize_whole_s": t_whole,
            "tokenize_pieces_s": t_pieces}


def load_seconds(base_model: Path) -> float:
    """Seconds a fresh interpreter takes to load the tokenizer the way render does (imports included)."""
    code = ("import sys, time; t = time.perf_counter(); sys.path.insert(0, sys.argv[1]); "
            "from pipeline.core.models import load_fast_tokenizer; load_fast_tokenizer(sys.argv[2]); "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code, str(REPO), str(base_model)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-per-task", type=int, default=25_000, help="embedded examples per task (4 tasks)")
    parser.add_argument("--base-model", type=Path, default=REPO / "models" / "base",
                        help="a checkpoint directory with the tokenizer (the base_model stage output)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the timed parts; medians are reported")
    parser.add_argument("--smoke", action="store_true", help="250 examples per task: checks the script runs")
    args = parser.parse_args(argv)
    n_per_task = 250 if args.smoke else args.n_per_task
    if not (args.base_model / "tokenizer.json").exists():
        print(f"no tokenizer in {args.base_model}: pass --base-model (e.g. models/base after `dvc repro base_model`)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        m = measure(n_per_task, args.base_model, Path(tmp), 1 if args.smoke else args.repeat)
    n = m["examples"]
    off = n / (m["prepare_off_s"] + m["render_s"])
    on = n / (m["prepare_on_s"] + m["render_s"])
    parts = {"tokenizer load (fresh process)": m["load_s"], "read prepared": m["read_s"],
             "templates": m["segments_s"], "tokenization": m["tokenize_pieces_s"]}
    print(f"examples: {n} ({m['rendered']} rendered); median of {len(m['runs']['render_s'])} rounds, each: "
          + "; ".join(f"{k[:-2]} " + " ".join(f"{t:.2f}" for t in ts) for k, ts in m["runs"].items()))
    print(f"prepare, near-dup off: {m['prepare_off_s']:.2f}s  ({n / m['prepare_off_s']:,.0f} ex/s)")
    print(f"prepare, near-dup on:  {m['prepare_on_s']:.2f}s  ({n / m['prepare_on_s']:,.0f} ex/s)")
    print(f"render ({parallel.workers()} processes): {m['render_s']:.2f}s  ({n / m['render_s']:,.0f} ex/s)")
    print(f"prepare + render, near-dup off: {off:,.0f} ex/s  ({off / GOAL:.2f}x the {GOAL:,} ex/s goal)")
    print(f"prepare + render, near-dup on:  {on:,.0f} ex/s  ({on / GOAL:.2f}x the goal)")
    print("render's parts, redone in one process: " + "; ".join(f"{k} {v:.2f}s" for k, v in parts.items()))
    texts = m["texts"]
    print(f"tokenization of {texts} texts: pieces.PieceEncoder {texts / m['tokenize_pieces_s']:,.0f} texts/s, "
          f"render.encode (whole texts) {texts / m['tokenize_whole_s']:,.0f}/s, "
          f"the tokenizer's own call {texts / m['tokenize_baseline_s']:,.0f}/s "
          f"({m['tokenize_baseline_s'] / m['tokenize_pieces_s']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
