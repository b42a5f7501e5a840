"""Lightning strategies built from ``trainer.strategy``: one process, DDP or FSDP.

The config names layer classes by dotted path (a string in YAML), and this builder
imports them, so ``conf/`` stays plain data and the strategy objects live only here.
Importing a module runs its code: a config is trusted like code (RELIABILITY.md).
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.core.config import ConfigError, StrategyConfig


def layer_class(path: str) -> type:
    """``package.module.ClassName`` -> the class (a torch module), with an error naming the config key."""
    import torch

    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError([f"trainer.strategy.auto_wrap: cannot import {path!r} ({err})"]) from None
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
        raise ConfigError([f"trainer.strategy.auto_wrap: {path!r} is not a torch.nn.Module class"])
    return found


def build(cfg: StrategyConfig) -> Any:
    """The ``strategy`` argument of ``lightning.Trainer`` for this config."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    if cfg.name == "auto":
        return "auto"
    if cfg.name == "ddp":
        return DDPStrategy(process_group_backend=cfg.process_group_backend)
    if cfg.name == "fsdp":
        # use_orig_params: LoRA freezes most parameters, and FSDP's flattened parameters
        # would otherwise have to be all-trainable or all-frozen per wrapped unit.
        return FSDPStrategy(process_group_backend=cfg.process_group_backend,
                            auto_wrap_policy={layer_class(p) for p in cfg.auto_wrap},
                            sharding_strategy=cfg.sharding, use_orig_params=True)  # type: ignore[arg-type]
    raise ValueError(f"trainer.strategy.name: unknown strategy {cfg.name!r}")
