"""Write what is derived, never hand-edited: ``params.yaml`` and the code deps in ``dvc.yaml``.

``params.yaml`` is the composition of ``conf/``, the file ``dvc repro`` and the stages
read; ``dvc exp run -S key=value`` composes ``conf/`` the same way (``hydra.enabled``).
Each ``dvc.yaml`` stage's ``pipeline/`` deps are the modules its entry module imports,
followed through every import (:mod:`pipeline.tracking.code_deps`).
``python -m pipeline.params`` rewrites both; ``python -m pipeline.params --check`` fails
when either has drifted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


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


def synced_dvc_yaml(dvc_yaml: Path, root: Path = REPO) -> tuple[str, str]:
    """``dvc_yaml``'s text now, and with each stage's code deps derived from its imports."""
    from pipeline.tracking.code_deps import stage_code, sync_dvc_yaml

    text = dvc_yaml.read_text(encoding="utf-8")
    return text, sync_dvc_yaml(text, stage_code(yaml.safe_load(text)["stages"], root))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.lr=1e-4 +experiment=smoke")
    parser.add_argument("--out", default="params.yaml", help="file to write (default: params.yaml)")
    parser.add_argument("--dvc-yaml", type=Path, default=REPO / "dvc.yaml", help="the pipeline whose code deps to sync")
    parser.add_argument("--check", action="store_true",
                        help="fail if --out differs from the composition or dvc.yaml's code deps from the imports")
    args = parser.parse_args(argv)
    params = compose(args.overrides)
    out = Path(args.out)
    now, derived = synced_dvc_yaml(args.dvc_yaml)
    if args.check:  # compare values, not formatting: DVC rewrites the file in its own style
        stale = [] if out.exists() and yaml.safe_load(out.read_text(encoding="utf-8")) == params else \
            [f"{out} is out of date with conf/"]
        stale += [] if now == derived else [f"{args.dvc_yaml}'s code deps are out of date with the imports"]
        for line in stale:
            print(f"{line}: run `python -m pipeline.params`", file=sys.stderr)
        return 1 if stale else 0
    out.write_text(dump(params), encoding="utf-8")
    if args.out == "params.yaml":  # composing elsewhere (--out X) leaves the pipeline alone
        args.dvc_yaml.write_text(derived, encoding="utf-8")
    return 0


if __name__ == "__main__":
    from pipeline.core.cli import guard

    sys.exit(guard("params", main))
