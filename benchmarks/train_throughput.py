"""Training throughput: our Lightning loop in each batching mode vs TRL's SFTTrainer vs a naive loop.

Same model, same rendered rows, fp32, the same tokens per optimizer step (B rows, or one
packed row of about B x mean-length tokens). Each case runs in a child process of this
script (so its peak RSS is its own), a few warmup steps then a few timed ones. Printed per
case: loss-bearing and real tokens/s, padding waste 1 - sum(len)/(B*L), peak RSS, and MFU
against an fp32 matmul peak measured in the same run. Ratios are against TRL's default
and packed modes measured in the same run.

    python benchmarks/train_throughput.py                       # SmolLM2-135M, LoRA and full
    python benchmarks/train_throughput.py --data t0             # real rows: the T0 files at 512 tokens
    python benchmarks/train_throughput.py --smoke --model DIR   # seconds, on a tiny model

TRL is the ``bench`` extra (``pip install --no-deps trl``: it must not touch torch).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OURS = ("default", "dynamic", "length_grouped", "packed")
CASES = (*[f"ours_{m}" for m in OURS], "trl_default", "trl_packed", "naive_hf")


def matmul_peak(n: int = 1024, reps: int = 5) -> float:
    """fp32 GFLOP/s of the best of a few n x n matmuls: the ceiling MFU is measured against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def flops_per_token(cfg, n_params: int, n_lora: int, n_head: int, seq_len: float, method: str,
                    loss_fraction: float) -> float:
    """Useful model FLOPs per real token: 6N + 12·n_layer·d·T for full fine-tuning; LoRA skips the
    frozen weights' gradients (4N + 6N_lora + attention). The lm_head (``n_head`` = vocab x d
    weights) counts only at loss-bearing positions (``loss_fraction`` of the real tokens): logits
    elsewhere are waste, so a loop that computes them gets no credit for it."""
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    body = n_params - n_lora - n_head  # n_params counts only the weights matmuls use (see main)
    per_weight = 6 if method == "full" else 4
    return per_weight * body + per_weight * n_head * loss_fraction + (6 * n_lora if method != "full" else 0) + attention


class Meter:
    """Counts tokens of the batches after warmup, and their wall time.

    Counts stay tensors on the batch's device until :meth:`result`: reading them each step
    would be a host sync per step on a GPU, which the loops being measured do not pay.
    """

    def __init__(self, warmup: int):
        self.warmup, self.steps, self.start, self.stop = warmup, 0, 0.0, 0.0
        self.real = self.loss = self.slots = self.docs = 0  # ints or 0-d tensors
        self.plan: dict | None = None  # our cases: the resolved batching plan

    def batch(self, batch: dict) -> None:
        self.steps += 1
        if self.steps == self.warmup + 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the warm-up steps' queued work is not counted
            self.start = time.perf_counter()
        if self.steps <= self.warmup:
            return
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        self.real += mask.sum() if mask is not None else ids.numel()
        self.slots += ids.numel()
        self.loss += (batch["labels"][:, 1:] != -100).sum()
        pos = batch.get("position_ids")
        self.docs += (pos == 0).sum() if pos is not None and mask is None else ids.shape[0]

    def end(self) -> None:
        """The step's work is done (GPU synchronized): later teardown is not counted."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stop = time.perf_counter()

    def result(self) -> dict:
        if not self.stop:
            self.end()
        seconds = self.stop - self.start
        real, loss, slots, docs = (int(x) for x in (self.real, self.loss, self.slots, self.docs))
        return {"seconds": seconds, "real_tok_s": real / seconds, "loss_tok_s": loss / seconds,
                "waste_pct": 100 * (1 - real / slots), "mean_len": real / max(docs, 1)}


def _model(model_dir: str, method: str):  # type: ignore[no-untyped-def]
    """The model as the train stage builds it, with the project's own finetune config."""
    import dataclasses

    from pipeline.core.config import from_mapping
    from pipeline.core.models import apply_finetune, load_causal_lm
    from pipeline.params import compose

    torch.manual_seed(0)
    finetune = dataclasses.replace(from_mapping(compose([]), source="conf/").finetune, method=method)
    return apply_finetune(load_causal_lm(model_dir), finetune)


def run_ours(mode: str, args, rendered: Path) -> Meter:  # type: ignore[no-untyped-def]
    """Our Lightning loop; ``mode`` "default" takes trainer.batching, pack_length and
    gradient_checkpointing from the project's config (auto: what a user gets), any other mode
    is forced, with --gradient-checkpointing."""
    import dataclasses

    import lightning as L

    from pipeline.core.config import from_mapping
    from pipeline.core.files import read_jsonl
    from pipeline.params import compose
    from pipeline.training.module import InstructionTuner, RenderedData, prepare_for_batching

    model = _model(args.model, args.method)
    # --micro-batches N: the same tokens per optimizer step in N micro-batches (gradient accumulation).
    n = args.micro_batches
    forced = {} if mode == "default" else {
        "batching": mode, "pack_length": max(1, args.pack_length // n), "micro_batches": n,
        "gradient_checkpointing": {"true": True, "false": False}.get(args.gradient_checkpointing, "auto")}
    cfg = dataclasses.replace(
        from_mapping(compose(["trainer=gpu"] if args.accelerator == "gpu" else []), source="conf/").trainer,
        accelerator=args.accelerator, precision=args.precision,
        batch_size=args.batch_size, max_steps=args.warmup + args.steps + bool(args.profile), lr=1e-4,
        warmup_ratio=0.0, gradient_clip_val=None, val_check_interval=1000, log_every_n_steps=1000, num_workers=0,
        compile=args.compile, **forced,
        **({"activation_budget_mb": args.activation_budget_mb} if args.activation_budget_mb else {}))
    lengths = [len(r["input_ids"]) for r in read_jsonl(rendered / "train.jsonl")]
    plan = prepare_for_batching(model, cfg, lengths)
    cfg = plan.trainer(cfg)  # rows per micro-batch, micro-batches accumulated
    n = cfg.accumulate_grad_batches
    meter = Meter(args.warmup * n)
    meter.plan = plan.to_dict() | {"activation_mb": plan.activation_mb}
    timed_end = (args.warmup + args.steps) * n  # micro-batches; one more step follows under --profile
    profiler = None

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):  # type: ignore[no-untyped-def]
            nonlocal profiler
            if meter.steps < timed_end:
                meter.batch(batch)
            elif profiler is None:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
                profiler.start()

        def on_train_batch_end(self, trainer, module, outputs, batch, idx):  # type: ignore[no-untyped-def]
            if meter.steps == timed_end and not meter.stop:
                meter.end()

        def on_train_end(self, trainer, module):  # type: ignore[no-untyped-def]
            if profiler is not None:  # before fit's teardown, which is not the step's work
                profiler.stop()
                write_profile(profiler, Path(args.profile) / f"{args.method}_{args.case}.txt")

    trainer = L.Trainer(accelerator=cfg.accelerator, devices=1, precision=cfg.precision,  # type: ignore[arg-type]
                        max_steps=cfg.max_steps, accumulate_grad_batches=cfg.accumulate_grad_batches, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Count()])
    data = RenderedData(rendered, cfg.batch_size, 0, seed=0, batching=cfg.batching, pack_length=cfg.pack_length)
    trainer.fit(InstructionTuner(model, cfg), datamodule=data)
    return meter


def write_profile(profiler, path: Path) -> None:  # type: ignore[no-untyped-def]
    """The profiled step's top operators: by GPU time on a GPU (with the CPU time that launched
    them: a launch-bound step shows CPU time far above GPU time), else by CPU time."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profiler.key_averages().table(sort_by=key, row_limit=25) + "\n")


def run_trl(packing: bool, args, rows: list[dict]) -> Meter:  # type: ignore[no-untyped-def]
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = _model(args.model, args.method)
    meter = Meter(args.warmup)

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, *a, **kw):  # type: ignore[no-untyped-def]
            meter.batch(inputs)
            return super().training_step(model, inputs, *a, **kw)

    data = Dataset.from_list([{"input_ids": r["input_ids"],
                               "completion_mask": [int(t != -100) for t in r["labels"]]} for r in rows])
    cfg = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, learning_rate=1e-4,
                    per_device_train_batch_size=1 if packing else args.batch_size, packing=packing,
                    packing_strategy="bfd", max_length=args.pack_length if packing else None,
                    gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to=[],
                    logging_steps=1000, save_strategy="no", completion_only_loss=True, dataloader_num_workers=0,
                    seed=0, disable_tqdm=True)
    Counting(model=model, args=cfg, train_dataset=data).train()
    return meter


def run_naive(args, rows: list[dict]) -> Meter:  # type: ignore[no-untyped-def]
    """Every batch padded to the longest row of the data, full logits, transformers' own loss."""
    from pipeline.training.module import collate

    model = _model(args.model, args.method)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    width = max(len(r["input_ids"]) for r in rows)
    meter = Meter(args.warmup)
    for step in range(args.warmup + args.steps):
        chunk = [rows[(step * args.batch_size + i) % len(rows)] for i in range(args.batch_size)]
        padded = [{"input_ids": r["input_ids"] + [0] * (width - len(r["input_ids"])),
                   "labels": r["labels"] + [-100] * (width - len(r["labels"]))} for r in chunk]
        batch = collate(padded, 0)
        batch["attention_mask"] = collate(chunk, 0)["attention_mask"].new_zeros(len(chunk), width)
        for i, r in enumerate(chunk):
            batch["attention_mask"][i, :len(r["input_ids"])] = 1
        meter.batch(batch)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return meter


def measure(args) -> dict:  # type: ignore[no-untyped-def]
    """One case (``args.case``) for one method; peak RSS is the process's own."""
    from pipeline.core.files import read_jsonl

    rendered = Path(args.rendered)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_jsonl(rendered / "train.jsonl")]
    case = args.case
    if case.startswith("ours_"):
        meter = run_ours(case.removeprefix("ours_"), args, rendered)
    elif case.startswith("trl_"):
        meter = run_trl(case == "trl_packed", args, rows)
    else:
        meter = run_naive(args, rows)
    out = meter.result()
    if meter.plan is not None:
        out["plan"] = meter.plan
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def in_child(args, case: str, method: str) -> dict | None:  # type: ignore[no-untyped-def]
    """Run one case in a fresh interpreter, so its peak RSS and allocator state are its own."""
    cmd = [sys.executable, __file__, "--case", case, "--method", method, "--model", args.model,
           "--rendered", str(args.rendered), "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--pack-length", str(args.pack_length),
           "--micro-batches", str(args.micro_batches), "--gradient-checkpointing", args.gradient_checkpointing,
           *(["--activation-budget-mb", str(args.activation_budget_mb)] if args.activation_budget_mb else []),
           "--accelerator", args.accelerator, "--precision", args.precision] + (["--compile"] if args.compile else [])
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        print(f"{method:4} {case:20} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(line[0].removeprefix("RESULT "))


def prepare_rows(args, tmp: Path) -> Path:  # type: ignore[no-untyped-def]
    """The rendered rows as the train stage reads them: --rendered, (--data t0) the shared T0 files
    through the real prepare and render stages at --max-length tokens, or (smoke) the embedded examples."""
    if args.data == "t0":
        return render_t0(args, tmp)
    if not args.smoke:
        return Path(args.rendered)
    from pipeline.core.config import from_mapping
    from pipeline.data.embedded import generate
    from pipeline.core.files import write_json, write_jsonl
    from pipeline.core.models import load_tokenizer
    from pipeline.params import compose
    from pipeline.prompting.rows import tokenize_split
    from pipeline.prompting.templates import make_template

    cfg = from_mapping(compose(["+experiment=smoke"]), source="+experiment=smoke")
    tok = load_tokenizer(args.model)
    template = make_template(cfg.prompt, tok.chat_template, tok.bos_token, tok.eos_token)
    rows, _ = tokenize_split([e.to_dict() for e in generate(seed=0, n_per_task=8)], template, tok, 128,
                                    "truncate")
    write_jsonl(tmp / "train.jsonl", rows)
    write_jsonl(tmp / "val.jsonl", [])
    write_json(tmp / "template.json", template.to_dict())
    return tmp


def render_t0(args, tmp: Path) -> Path:  # type: ignore[no-untyped-def]
    """``+experiment=t0`` (the four T0 files beside the checkout) prepared and rendered by the stages
    themselves, at ``prompt.max_length=--max-length``: the rows a user of that experiment trains on."""
    import os

    from pipeline import prepare, render
    from pipeline.core.config import from_mapping
    from pipeline.params import compose

    overrides = ["+experiment=t0", f"prompt.max_length={args.max_length}"]
    cfg = from_mapping(compose(overrides), source=" ".join(overrides))
    os.chdir(ROOT)  # the experiment's data paths are relative to the checkout
    prepare.run(cfg, prepare.Paths(out=tmp / "prepared", stats=tmp / "stats.json", plot=None))
    render.run(cfg, render.Paths(prepared=tmp / "prepared", base_model=Path(args.model), out=tmp / "rendered",
                                 report=tmp / "render.json", plot=None))
    return tmp / "rendered"


def _plan(plan: dict) -> str:
    """The resolved batching plan in a few words."""
    rows = f"packed {plan['pack_length']}-token rows" if plan["batching"] == "packed" else plan["batching"]
    return (f"{rows}, {plan['micro_batches']} per step, ~{plan['activation_mb']:.0f} MB activations each, "
            f"checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}")


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def summarize(method: str, cases: list[str], rounds: list[dict[str, dict]]) -> None:
    """Medians over rounds, and each ratio against TRL taken within a round (same load), then its median."""
    if len(rounds) > 1:
        # A matmul peak measured next to a case can catch a slow moment: MFU against the run's
        # highest measured peak (the machine's ceiling) is the one to compare.
        ceiling = max(r["peak_gflops"] for results in rounds for r in results.values())
        for case in cases:
            got = [r[case] for r in rounds if case in r]
            if got:
                mfu = _median([100 * g["real_tok_s"] * g["flops_per_token"] / (ceiling * 1e9) for g in got])
                print(f"{method:4} {case:20} median of {len(got)}: loss-bearing "
                      f"{_median([g['loss_tok_s'] for g in got]):8.1f} tok/s  real {_median([g['real_tok_s'] for g in got]):8.1f}"
                      f" tok/s  peak RSS {max(g['peak_rss_mb'] for g in got):6.0f} MB  MFU {mfu:5.1f}% of the run's"
                      f" highest peak {ceiling:.0f} GFLOP/s")
    for base in ("trl_default", "trl_packed"):
        for case in (c for c in cases if c.startswith("ours_")):
            ratios = [r[case]["loss_tok_s"] / r[base]["loss_tok_s"] for r in rounds if case in r and base in r]
            if ratios:
                print(f"{method:4} ratio {case} / {base} (loss-bearing tok/s): {_median(ratios):.2f}x "
                      f"(per round: {', '.join(f'{x:.2f}' for x in ratios)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "base"), help="checkpoint dir (safetensors + tokenizer)")
    p.add_argument("--rendered", default=str(ROOT / "data" / "rendered"), help="render stage output (train.jsonl)")
    p.add_argument("--data", choices=("rendered", "t0"), default="rendered",
                   help="t0: render the shared T0 files (+experiment=t0) at --max-length tokens and train on them")
    p.add_argument("--max-length", type=int, default=512, help="--data t0: prompt.max_length")
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of all cases (medians, per-round ratios)")
    p.add_argument("--compile", action="store_true", help="trainer.compile for our cases")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="our cases: each optimizer step's rows (or packed tokens) in this many micro-batches, "
                        "gradients accumulated: the same tokens per step, less activation memory")
    p.add_argument("--activation-budget-mb", type=int, help="our cases: trainer.activation_budget_mb (default: the config's)")
    p.add_argument("--gradient-checkpointing", choices=("false", "true", "auto"), default="false",
                   help="our forced-mode cases (ours_default takes the config's, auto)")
    p.add_argument("--accelerator", default="cpu", help="our cases only (benchmarks/gpu_check.sh: gpu)")
    p.add_argument("--precision", default="32-true", help="our cases only (gpu_check.sh: bf16-mixed)")
    p.add_argument("--profile", metavar="DIR",
                   help="our cases: profile one more step after the timed ones (not counted) and write its "
                        "top operators to DIR/METHOD_CASE.txt")
    p.add_argument("--peak-flops", type=float, help="matmul peak in FLOP/s measured elsewhere (GPU bf16)")
    p.add_argument("--smoke", action="store_true", help="embedded rows, LoRA, 1 warmup + 2 timed steps, in-process")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--pack-length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(measure(args)))
        return 0
    if args.smoke:
        args.warmup, args.steps, args.methods = 1, 2, "lora"
    from pipeline.core.files import read_jsonl
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory() as tmp:
        rendered = args.rendered = prepare_rows(args, Path(tmp))
        lengths = [len(r["input_ids"]) for r in read_jsonl(rendered / "train.jsonl")]
        pack_length = args.pack_length = max(max(lengths), round(args.batch_size * sum(lengths) / len(lengths)))
        peak = args.peak_flops / 1e9 if args.peak_flops else matmul_peak()
        print(f"{len(lengths)} rows, mean length {sum(lengths) / len(lengths):.0f}, batch {args.batch_size} rows "
              f"or one packed row of {pack_length} tokens"
              + (f" (ours: in {args.micro_batches} micro-batches)" if args.micro_batches > 1 else "")
              + f"; {'given' if args.peak_flops else 'fp32'} matmul peak {peak:.1f} GFLOP/s")
        mcfg = AutoConfig.from_pretrained(args.model)
        for method in args.methods.split(","):
            model = _model(args.model, method)
            n_params = sum(p.numel() for p in model.parameters())
            n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
            head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
            n_head = head.numel()
            if embed.data_ptr() != head.data_ptr():  # an untied input embedding is a lookup, not a matmul
                n_params -= embed.numel()
            del model
            cases = args.cases.split(",")
            rounds: list[dict[str, dict]] = []
            for k in range(args.rounds):  # interleaved: each round runs every case, in a rotated order
                order = cases[k % len(cases):] + cases[:k % len(cases)]
                results: dict[str, dict] = {}
                for case in order:
                    if args.smoke:  # in-process: seconds, not a fresh interpreter per case (RSS is cumulative then)
                        r = measure(argparse.Namespace(**{**vars(args), "case": case, "method": method}))
                    else:
                        r = in_child(args, case, method)
                    if r is None:
                        continue
                    round_peak = peak if args.peak_flops or args.smoke else matmul_peak()  # next to the case
                    fpt = flops_per_token(mcfg, n_params, n_lora, n_head, r["mean_len"], method,
                                          r["loss_tok_s"] / r["real_tok_s"])
                    r["mfu_pct"] = 100 * r["real_tok_s"] * fpt / (round_peak * 1e9)
                    r["flops_per_token"] = fpt
                    r["peak_gflops"] = round_peak
                    results[case] = r
                    print(f"{method:4} {case:20} round {k + 1}: loss-bearing {r['loss_tok_s']:8.1f} tok/s  real "
                          f"{r['real_tok_s']:8.1f} tok/s  waste {r['waste_pct']:5.1f}%  peak RSS "
                          f"{r['peak_rss_mb']:6.0f} MB  MFU {r['mfu_pct']:5.1f}% of {round_peak:.0f} GFLOP/s"
                          + (f"  peak GPU {r['peak_gpu_mb']:6.0f} MB" if "peak_gpu_mb" in r else "")
                          + (f"  [{_plan(r['plan'])}]" if "plan" in r else ""), flush=True)
                rounds.append(results)
            summarize(method, cases, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
