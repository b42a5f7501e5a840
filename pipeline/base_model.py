"""Stage 1, base_model: materialize the configured pre-trained model once.

Reads ``model`` and ``seed`` from params.yaml; writes a safetensors checkpoint, the
tokenizer (with its chat template) and ``model_info.json`` to ``--out``. DVC caches the
output, so the slow GGUF dequantization runs only when ``model`` changes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from pipeline.core import config
from pipeline.core.files import atomic_dir
from pipeline.core.models import materialize


def run(model_cfg: config.ModelConfig, seed: int, out: Path) -> dict[str, Any]:
    """Write the base checkpoint to ``out`` atomically; return its info."""
    start = time.perf_counter()
    print(f"base_model: materializing {model_cfg.name} from {model_cfg.path} ({model_cfg.init}) ...", flush=True)
    with atomic_dir(out) as tmp:
        info = materialize(model_cfg, tmp, seed)
    print(f"base_model: {info['parameters']:,} parameters -> {out} in {time.perf_counter() - start:.1f}s", flush=True)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    args = parser.parse_args(argv)
    cfg = config.load(args.params)
    run(cfg.model, cfg.seed, args.out)
    return 0


if __name__ == "__main__":
    from pipeline.cli import guard

    sys.exit(guard("base_model", main))
