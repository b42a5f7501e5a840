"""Stage 1, base_model: materialize the configured pre-trained model once.

Reads ``model`` and ``seed``; writes a safetensors checkpoint, the tokenizer (with its chat
template) and ``model_info.json`` to ``--out``. DVC caches the output, so the slow GGUF
dequantization runs only when ``model`` changes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.core import cli, config
from pipeline.core.files import atomic_dir
from pipeline.core.models import materialize


@dataclass(frozen=True)
class Paths:
    out: Path = cli.field("checkpoint directory to write")


def run(cfg: config.PipelineConfig, paths: Paths) -> dict[str, Any]:
    """Write the base checkpoint to ``paths.out`` atomically; return its info."""
    start = time.perf_counter()
    print(f"base_model: materializing {cfg.model.name} from {cfg.model.path} ({cfg.model.init}) ...", flush=True)
    with atomic_dir(paths.out) as tmp:
        info = materialize(cfg.model, tmp, cfg.seed)
    print(f"base_model: {info['parameters']:,} parameters -> {paths.out} in {time.perf_counter() - start:.1f}s",
          flush=True)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    params, paths = cli.parse(__doc__, Paths, argv)
    run(config.load(params), paths)
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard("base_model", main))
