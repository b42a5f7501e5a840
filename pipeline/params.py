"""Compose ``conf/`` into ``params.yaml``, the file ``dvc repro`` and the stages read.

``params.yaml`` is generated, never hand-edited: ``python -m pipeline.params`` rewrites
it, ``python -m pipeline.params --check`` fails when it has drifted from ``conf/``.
``dvc exp run -S key=value`` composes ``conf/`` the same way (``hydra.enabled``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """Compose ``conf/config.yaml`` with Hydra overrides into a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def dump(params: dict[str, Any]) -> str:
    """YAML text in composition order, block style."""
    return yaml.safe_dump(params, sort_keys=False, default_flow_style=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.lr=1e-4 +experiment=smoke")
    parser.add_argument("--out", default="params.yaml", help="file to write (default: params.yaml)")
    parser.add_argument("--check", action="store_true", help="fail if --out differs from the composition")
    args = parser.parse_args(argv)
    params = compose(args.overrides)
    out = Path(args.out)
    if args.check:  # compare values, not formatting: DVC rewrites the file in its own style
        if not out.exists() or yaml.safe_load(out.read_text(encoding="utf-8")) != params:
            print(f"{out} is out of date with conf/: run `python -m pipeline.params`", file=sys.stderr)
            return 1
        return 0
    out.write_text(dump(params), encoding="utf-8")
    return 0


if __name__ == "__main__":
    from pipeline.cli import guard

    sys.exit(guard("params", main))
