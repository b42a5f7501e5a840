"""Evaluation generation: the batched path against a per-example ``generate()`` loop.

Both paths run in this process on the same model and the same test prompts (the
embedded default's test split, rendered with the configured prompt template, an equal
share per task), greedy, with each task type's ``eval.max_new_tokens`` and the model's
EOS. Generated tokens are the new token ids up to and including EOS; the script also
reports how many answers the two paths agree on (greedy: all, up to float rounding).

    python benchmarks/eval_throughput.py                    # the 135M model in models/base
    python benchmarks/eval_throughput.py --smoke            # tiny random model, 8 prompts, seconds

Settings not given on the command line come from conf/ (the same composition as the pipeline).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline import base_model, prepare
from pipeline.core.config import PipelineConfig, from_mapping
from pipeline.evaluation.generation import generate_ids, one_by_one_ids, plain_greedy
from pipeline.core.models import load_causal_lm, load_tokenizer
from pipeline.data.schema import ProblemCollector
from pipeline.params import compose
from pipeline.prompting.templates import make_template
from pipeline.prompting.rows import tokenize_split

REPO = Path(__file__).resolve().parents[1]


def test_prompts(cfg: PipelineConfig, tokenizer: Any, n: int) -> tuple[list[list[int]], list[int]]:
    """``n`` rendered test prompts, an equal share per task, and each one's token budget."""
    rows, _ = prepare.load(cfg.data, cfg.seed, ProblemCollector(cfg.data.max_problems))
    splits = prepare.split(rows, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
    tasks = sorted({e.task for e in splits["test"]})
    per_task = -(-n // len(tasks))
    chosen = [e for t in tasks for e in [x for x in splits["test"] if x.task == t][:per_task]][:n]
    template = make_template(cfg.prompt, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    rows, _ = tokenize_split([e.to_dict() for e in chosen], template, tokenizer, cfg.prompt.max_length,
                             cfg.prompt.overflow)
    prompts = [r["input_ids"][: r["labels"].index(next(t for t in r["labels"] if t != -100))] for r in rows]
    return prompts, [cfg.eval.max_new_tokens[r["task_type"]] for r in rows]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="a base_model stage output (default: models/base, or a fresh smoke model with --smoke)")
    parser.add_argument("--n", type=int, default=None, help="prompts (default 64, 8 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size from conf/")
    parser.add_argument("--decode-batch-size", type=int, default=None,
                        help="rows decoded together (default: eval.decode_batch_size from conf/)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both paths (default: torch's, one per core)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model and 8 prompts: seconds")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. eval.max_new_tokens.free_text=20")
    args = parser.parse_args(argv)
    cfg = from_mapping(compose((["+experiment=smoke"] if args.smoke else []) + list(args.overrides)))
    if args.threads:  # on a shared machine, 1 thread avoids OpenMP workers waiting on a busy core
        torch.set_num_threads(args.threads)
    n = args.n or (8 if args.smoke else 64)
    batch_size = args.batch_size or cfg.eval.batch_size
    group = args.decode_batch_size or cfg.eval.decode_batch_size
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or (REPO / "models" / "base")
        if args.smoke and args.model is None:
            model_dir = Path(tmp) / "base"
            base_model.run(cfg, base_model.Paths(model_dir))
        tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    prompts, budgets = test_prompts(cfg, tokenizer, n)
    print(f"{len(prompts)} prompts, {sum(map(len, prompts))} prompt tokens, budgets {sorted(set(budgets))}, "
          f"prefill batch {batch_size}, decode batch {group}, {torch.get_num_threads()} threads, model {model_dir}")
    generate_ids(model, tokenizer, prompts[:2], budgets[:2], batch_size, cfg.eval.stop_strings, desc="warm-up")
    print("batched path: " + ("own greedy loop (shared prefix, rows leave when done)" if plain_greedy(model)
                              else "model.generate (the generation config has logits processors)"))

    # Interleaved: each decode group the batched path forms (same sort as generate_ids) is timed,
    # then the per-example loop on the same prompts, so background load hits both paths alike.
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], len(prompts[i])))
    batched: list[list[int]] = []
    single: list[list[int]] = []
    t_batched = t_single = 0.0
    for k in range(0, len(order), group):
        chunk = order[k:k + group]
        p, b = [prompts[i] for i in chunk], [budgets[i] for i in chunk]
        start = time.perf_counter()
        batched += generate_ids(model, tokenizer, p, b, batch_size, cfg.eval.stop_strings, desc="batched",
                                decode_batch_size=group)
        t_batched += time.perf_counter() - start
        start = time.perf_counter()
        single += one_by_one_ids(model, tokenizer, p, b, cfg.eval.stop_strings)
        t_single += time.perf_counter() - start
        print(f"group {k // group + 1}: batched {t_batched:.1f}s, per-example {t_single:.1f}s so far", flush=True)

    tok_batched, tok_single = sum(map(len, batched)), sum(map(len, single))
    same = sum(a == b for a, b in zip(batched, single))
    print(f"per-example loop: {tok_single} tokens in {t_single:.2f}s = {tok_single / t_single:.1f} tokens/s")
    print(f"batched:          {tok_batched} tokens in {t_batched:.2f}s = {tok_batched / t_batched:.1f} tokens/s")
    print(f"ratio (batched / per-example tokens/s): {(tok_batched / t_batched) / (tok_single / t_single):.2f}x")
    print(f"identical answers: {same}/{len(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
