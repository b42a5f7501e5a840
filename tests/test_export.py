"""The export stage on the smoke model: a real (non-zero) LoRA adapter merged by peft, the merged
checkpoint's logits equal to the adapter model's within export.atol, byte-identical folders from two
runs, full fine-tuning exported as it is, a merge that changes the logits refused, and export off."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline import export
from pipeline.core.config import PipelineConfig
from pipeline.core.errors import ModelError
from pipeline.core.files import read_json, write_json


def make_tuned(cfg: PipelineConfig, base: Path, rendered: Path, out: Path, method: str = "lora") -> Path:
    """What train saves (adapter/ or model/, template.json), with weights moved off their init."""
    import torch

    from pipeline.core.models import apply_finetune, load_causal_lm

    finetune = dataclasses.replace(cfg.finetune, method=method, lora=cfg.finetune.lora if method == "lora" else None)
    model = apply_finetune(load_causal_lm(base), finetune)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: an untrained adapter would merge to the base model
        for name, p in model.named_parameters():
            if method == "full" or "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out / ("adapter" if method == "lora" else "model"), safe_serialization=True)
    write_json(out / "template.json", read_json(rendered / "template.json"))
    return out


def _paths(root: Path, data: Path, base: Path, tuned: Path) -> export.Paths:
    return export.Paths(data / "rendered", base, tuned, root / "export", root / "check.json")


def _files(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_lora_merge_matches_the_adapter_and_is_deterministic(tmp_path: Path, smoke_cfg: PipelineConfig,
                                                            smoke_data: Path, smoke_base: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.core.models import load_causal_lm

    tuned = make_tuned(smoke_cfg, smoke_base, smoke_data / "rendered", tmp_path / "tuned")
    first = _paths(tmp_path / "a", smoke_data, smoke_base, tuned)
    check = export.run(smoke_cfg, first)
    assert check["method"] == "lora" and check["passed"] and check["rows"] == smoke_cfg.export.check_rows
    assert 0 <= check["max_abs_diff"] <= smoke_cfg.export.atol
    assert read_json(first.check) == check
    names = set(_files(first.out))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "template.json", export.SOURCE_FILE} <= names
    assert not any("adapter" in n for n in names)  # a standalone checkpoint: no peft needed to load it
    # Loads with transformers alone, and the adapter changed what the model says.
    merged = AutoModelForCausalLM.from_pretrained(first.out, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.allclose(merged(ids).logits, load_causal_lm(smoke_base)(ids).logits)
    assert AutoTokenizer.from_pretrained(first.out).chat_template == read_json(
        smoke_data / "rendered" / "template.json")["chat_template"]
    second = _paths(tmp_path / "b", smoke_data, smoke_base, tuned)
    export.run(smoke_cfg, second)
    assert _files(first.out) == _files(second.out)  # the bytes dvc.lock records
    assert first.check.read_bytes() == second.check.read_bytes()


def test_full_finetune_is_exported_as_it_is(tmp_path: Path, smoke_cfg: PipelineConfig, smoke_data: Path,
                                            smoke_base: Path) -> None:
    from safetensors.torch import load_file

    tuned = make_tuned(smoke_cfg, smoke_base, smoke_data / "rendered", tmp_path / "tuned", method="full")
    paths = _paths(tmp_path, smoke_data, smoke_base, tuned)
    check = export.run(smoke_cfg, paths)
    assert check["method"] == "full" and check["max_abs_diff"] == 0.0
    saved, exported = load_file(tuned / "model" / "model.safetensors"), load_file(paths.out / "model.safetensors")
    assert saved.keys() == exported.keys() and all((saved[k] == exported[k]).all() for k in saved)


def test_a_merge_that_changes_the_logits_is_refused(tmp_path: Path, monkeypatch, smoke_cfg: PipelineConfig,
                                                    smoke_data: Path, smoke_base: Path) -> None:
    import torch

    from pipeline.training import merge

    real = merge.merge

    def off_by_a_bit(model, method):
        out = real(model, method)
        with torch.no_grad():
            out.get_output_embeddings().weight.add_(1e-2)
        return out

    monkeypatch.setattr(merge, "merge", off_by_a_bit)
    tuned = make_tuned(smoke_cfg, smoke_base, smoke_data / "rendered", tmp_path / "tuned")
    paths = _paths(tmp_path, smoke_data, smoke_base, tuned)
    with pytest.raises(ModelError, match="export.atol"):
        export.run(smoke_cfg, paths)
    assert not paths.out.exists() and not paths.check.exists()


def test_export_off_writes_only_the_reason(tmp_path: Path, smoke_cfg: PipelineConfig, smoke_data: Path,
                                           smoke_base: Path) -> None:
    cfg = dataclasses.replace(smoke_cfg, export=dataclasses.replace(smoke_cfg.export, enabled=False))
    paths = _paths(tmp_path, smoke_data, smoke_base, tmp_path / "no-model")
    assert export.run(cfg, paths) == {"skipped": "export.enabled is false"}
    assert sorted(p.name for p in paths.out.iterdir()) == ["skipped.json"]
