"""Attention for one packed row: the ways to keep its documents apart, timed forward + backward.

The row is the first ``--docs`` rendered training rows back to back (their real lengths),
with SmolLM2-135M's attention shape (9 query heads, 3 key/value heads, head dim 64).
Every path is checked against ``pipeline.training.packing.packed_sdpa`` before it is timed;
ratios are against it, measured in the same process, rounds alternating.

    python benchmarks/packed_attention.py                  # CPU, fp32
    python benchmarks/packed_attention.py --device cuda    # adds the flash varlen call (bf16 autocast)
    python benchmarks/packed_attention.py --smoke          # a second, for the test suite
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.training.packing import packed_sdpa  # noqa: E402


def doc_lengths(rendered: Path, n: int) -> list[int]:
    """Lengths of the first ``n`` rendered training rows (random 40-120 where there are none)."""
    path = rendered / "train.jsonl"
    if path.is_file():
        with path.open() as f:
            lengths = [len(json.loads(line)["input_ids"]) for _, line in zip(range(n), f)]
        if lengths:
            return lengths
    return torch.randint(40, 121, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def paths(lengths: list[int], device: str) -> dict[str, Callable]:
    """Each path maps (q [1,H,T,D], k, v [1,KV,T,D]) to the output [1,T,H,D]."""
    positions = torch.tensor([[p for n in lengths for p in range(n)]], device=device)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    longest = max(lengths)
    index = torch.zeros(len(lengths), longest, dtype=torch.long, device=device)
    valid = torch.zeros(len(lengths), longest, dtype=torch.bool, device=device)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        index[i, :n] = torch.arange(s, s + n)
        valid[i, :n] = True
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    t = torch.arange(len(doc), device=device)
    block = (doc[:, None] == doc[None, :]) & (t[None, :] <= t[:, None])
    module = torch.nn.Module()

    def ours(q, k, v):  # type: ignore[no-untyped-def]
        return packed_sdpa(module, q, k, v, None, position_ids=positions)[0]

    def per_document_repeat(q, k, v):  # type: ignore[no-untyped-def]  # the code before enable_gqa
        g = q.shape[1] // k.shape[1]
        outs = [F.scaled_dot_product_attention(q[:, :, s:s + n], k[:, :, s:s + n].repeat_interleave(g, 1),
                                               v[:, :, s:s + n].repeat_interleave(g, 1), is_causal=True)
                for s, n in zip(starts, lengths)]
        return torch.cat(outs, 2).transpose(1, 2)

    def padded_one_call(q, k, v):  # type: ignore[no-untyped-def]  # documents padded to the longest
        gather = lambda x: x[0][:, index].transpose(0, 1)  # noqa: E731  [docs, heads, longest, dim]
        out = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), is_causal=True, enable_gqa=True)
        return out.transpose(0, 1)[:, valid].unsqueeze(0).transpose(1, 2)

    def block_mask_one_call(q, k, v):  # type: ignore[no-untyped-def]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=block, enable_gqa=True).transpose(1, 2)

    return {"packed_sdpa (ours)": ours, "per-document, repeated kv heads": per_document_repeat,
            "one call, documents padded": padded_one_call, "one call, block mask": block_mask_one_call}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rendered", type=Path, default=ROOT / "data" / "rendered")
    p.add_argument("--docs", type=int, default=8, help="documents in the row (8 = one benchmark step)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=10, help="forward + backward calls timed per round")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.docs, args.rounds, args.calls = 3, 2, 1
    lengths = doc_lengths(args.rendered, args.docs)
    half = args.device.startswith("cuda")
    torch.manual_seed(0)
    T = sum(lengths)
    # As in the model: projections laid out [1, T, heads, dim], seen as [1, heads, T, dim].
    leaves = [torch.randn(1, T, h, args.head_dim, device=args.device, requires_grad=True)
              for h in (args.heads, args.kv_heads, args.kv_heads)]
    grad = torch.randn(1, T, args.heads, args.head_dim, device=args.device)
    fns = paths(lengths, args.device)

    def call(fn: Callable) -> torch.Tensor:
        for x in leaves:
            x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=half):
            out = fn(*(x.transpose(1, 2) for x in leaves))
        out.float().backward(grad)
        return out

    reference = call(fns["packed_sdpa (ours)"]).float()
    for name, fn in fns.items():
        err = (call(fn).float() - reference).abs().max().item()
        assert err < (3e-2 if half else 1e-5), f"{name}: differs from packed_sdpa by {err}"
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            if half:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.calls):
                call(fns[name])
            if half:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.calls)
    print(f"{len(lengths)} documents, lengths {min(lengths)}-{max(lengths)}, {T} tokens; {args.heads} query / "
          f"{args.kv_heads} key-value heads of {args.head_dim}; {args.device}"
          f"{' bf16 autocast' if half else ' fp32'}; median of {args.rounds} rounds x {args.calls} calls")
    ours = statistics.median(times["packed_sdpa (ours)"])
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"  {name:34s} {ms * 1e3:8.3f} ms per forward+backward   {ms / ours:5.2f}x ours")
    return 0


if __name__ == "__main__":
    sys.exit(main())
