"""Typed view of the composed configuration (``conf/`` -> ``params.yaml``).

Stages convert the raw mapping once, at their entry point, into these dataclasses and
never touch a ``DictConfig`` afterwards. Every problem (unknown key, wrong type, bad
value) is collected and reported in one :class:`ConfigError`. The values themselves live
only in ``conf/``; the dataclasses carry types, not defaults.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pipeline.core.errors import ConfigError

TASK_TYPES = ("classification", "short_answer", "free_text")
MODEL_KINDS = ("causal_lm", "sequence_classification")
# pipeline.data.formats.FORMATS (a test keeps them equal); spelled here so validating a config imports no data code.
DATA_FORMATS = ("alpaca", "dolly", "prompt_completion", "self_instruct_seed", "sharegpt", "openai_chat", "auto")
# What lightning.Trainer accepts (a test checks them against Lightning), spelled here because
# importing Lightning takes seconds and a bad value should stop before anything heavy loads.
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
              "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
SEED_RANGE = (0, 2**32 - 1)  # what numpy and Lightning's seed_everything accept
DOTTED_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING  # pkg://PACKAGE, a local directory, or a hub id
    gguf_file: Optional[str] = MISSING
    revision: Optional[str] = MISSING
    init: str = MISSING  # pretrained | random
    config_overrides: dict[str, Any] = MISSING
    trust_remote_code: bool = MISSING
    kind: str = MISSING  # causal_lm | sequence_classification (an encoder with a label head)

    def problems(self) -> list[str]:
        out = _choice("model.init", self.init, ("pretrained", "random"))
        out += _choice("model.kind", self.kind, MODEL_KINDS)
        out += _nonempty("model.name", self.name) + _nonempty("model.path", self.path)
        if self.kind == "sequence_classification" and self.gguf_file:
            out.append("model.gguf_file: not supported for model.kind=sequence_classification")
        return out


DEDUP_ACTIONS = ("remove", "report", "off")


@dataclass
class DedupConfig:
    """What prepare does about duplicates and train/eval overlap: each check removes, reports or is off."""

    exact: str = MISSING  # exact duplicates after normalization
    near: str = MISSING  # MinHash near-duplicates
    near_threshold: float = MISSING  # estimated Jaccard similarity of word shingles
    shingle: int = MISSING  # words per shingle
    num_perm: int = MISSING  # MinHash permutations
    contamination: str = MISSING  # train rows overlapping val/test (exact or n-gram)
    ngram: int = MISSING
    ngram_threshold: float = MISSING  # fraction of a train row's n-grams seen in val/test
    template_df: float = MISSING  # text in more than this share of a task's rows is its template: no evidence

    def problems(self) -> list[str]:
        out = _number("data.dedup.template_df", self.template_df, low=0, high=1, low_open=True)
        for key in ("exact", "near", "contamination"):
            out += _choice(f"data.dedup.{key}", getattr(self, key), DEDUP_ACTIONS)
        # MinHash LSH needs at least two bands, which rules out thresholds near 1 (use exact for those).
        if not 0 < self.near_threshold <= 0.95:
            out.append("data.dedup.near_threshold: must be in (0, 0.95]; exact duplicates are data.dedup.exact")
        if not 0 < self.ngram_threshold <= 1:
            out.append("data.dedup.ngram_threshold: must be in (0, 1]")
        for key in ("shingle", "ngram"):
            if getattr(self, key) < 1:
                out.append(f"data.dedup.{key}: must be >= 1")
        if self.num_perm < 64:
            out.append("data.dedup.num_perm: must be >= 64")
        return out


@dataclass
class SourceConfig:
    """One source of a mixture. A ``None`` key inherits the ``data.<key>`` value."""

    name: str = MISSING
    source: str = MISSING  # embedded | local | hub
    path: Optional[str] = None
    format: Optional[str] = None
    task: Optional[str] = None
    task_type: Optional[str] = None
    columns: Optional[dict[str, str]] = None
    hub_split: Optional[str] = None
    hub_config: Optional[str] = None
    hub_revision: Optional[str] = None
    weight: Optional[float] = None  # share of the mixture (all sources give one, or none does)
    cap: Optional[int] = None  # at most this many examples from this source

    def problems(self, where: str) -> list[str]:
        out = _choice(f"{where}.source", self.source, ("embedded", "local", "hub"))
        if self.source in ("local", "hub") and not self.path:
            out.append(f"{where}.path: required when source={self.source}")
        if self.task_type is not None:
            out += _choice(f"{where}.task_type", self.task_type, TASK_TYPES)
        if self.format is not None:
            out += _choice(f"{where}.format", self.format, DATA_FORMATS)
            if self.source == "embedded" and self.format in DATA_FORMATS and self.format != "auto":
                out.append(f"{where}.format: only read for local or hub sources (this one is embedded)")
        if self.weight is not None:
            out += _number(f"{where}.weight", self.weight, low=0, low_open=True)
        if self.cap is not None:
            out += _int_at_least(f"{where}.cap", self.cap, 1)
        return out


@dataclass
class DataConfig:
    source: str = MISSING
    n_per_task: int = MISSING
    generator_seed: int = MISSING
    path: Optional[str] = MISSING
    format: str = MISSING
    task: Optional[str] = MISSING
    task_type: Optional[str] = MISSING
    columns: dict[str, str] = MISSING
    hub_split: str = MISSING
    hub_config: Optional[str] = MISSING
    hub_revision: Optional[str] = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    on_error: str = MISSING  # fail | skip
    dedup: DedupConfig = MISSING
    max_problems: int = MISSING
    sources: list[SourceConfig] = MISSING  # mixture only
    group_by: str = MISSING  # auto | none | a field (input, meta.<column>, ...) | re:<pattern>

    def problems(self) -> list[str]:
        out = _choice("data.source", self.source, ("embedded", "local", "hub", "mixture"))
        out += _group_by_problems(self.group_by)
        out += _choice("data.on_error", self.on_error, ("fail", "skip"))
        out += _choice("data.format", self.format, DATA_FORMATS)
        if self.source == "embedded" and self.format in DATA_FORMATS and self.format != "auto":
            out.append(f"data.format: only read for local or hub data (data.source={self.source}); leave it auto")
        out += _seed("data.generator_seed", self.generator_seed)
        out += _int_at_least("data.max_problems", self.max_problems, 1)
        out += _nonempty("data.hub_split", self.hub_split)
        out += self.dedup.problems()
        if self.source == "mixture":
            out += self._mixture_problems()
        elif self.sources:
            out.append(f"data.sources: only used when data.source=mixture (it is {self.source!r})")
        if self.source in ("local", "hub") and not self.path:
            out.append(f"data.path: required when data.source={self.source}")
        if self.task_type is not None:
            out += _choice("data.task_type", self.task_type, TASK_TYPES)
        fractions = _number("data.val_fraction", self.val_fraction, low=0, high=1, high_open=True)
        fractions += _number("data.test_fraction", self.test_fraction, low=0, high=1, low_open=True, high_open=True)
        if not fractions and self.val_fraction + self.test_fraction >= 1:
            fractions.append("data.val_fraction + data.test_fraction: must be < 1 (train needs the rest)")
        out += fractions
        out += _int_at_least("data.n_per_task", self.n_per_task, 1)
        return out

    def _mixture_problems(self) -> list[str]:
        if not self.sources:
            return ["data.sources: list at least one source when data.source=mixture"]
        out = []
        for i, src in enumerate(self.sources):
            out += src.problems(f"data.sources[{i}]")
        names = [s.name for s in self.sources]
        out += [f"data.sources: name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
        if len({s.weight is None for s in self.sources}) > 1:
            out.append("data.sources: give every source a weight, or none")
        return out

    def missing_files(self, root: Path) -> list[str]:
        """One problem per local data file that does not exist (a relative path is read from ``root``,
        the working directory). Not part of :meth:`problems`: a config is valid wherever it is read,
        and only the stage that reads the data needs the files."""
        local = [("data.path", self.path)] if self.source == "local" else []
        local += [(f"data.sources[{i}].path", s.path) for i, s in enumerate(self.sources or [])
                  if s.source == "local"]
        return [f"{key}: {path} not found (relative to {root})" for key, path in local
                if path and not (root / path).exists()]

    def resolve(self, src: SourceConfig) -> "DataConfig":
        """This data config with one mixture source's keys in place of the inherited ones."""
        changes = {k: v for k, v in vars(src).items()
                   if v is not None and k not in ("name", "weight", "cap") and hasattr(self, k)}
        return replace(self, **changes, sources=[])


GROUP_FIELDS = ("instruction", "input", "output")  # pipeline.data.splits.FIELDS (a test keeps them equal)


def _group_by_problems(value: str) -> list[str]:
    """``data.group_by``: auto, none, an example field, ``meta.<column>`` or ``re:<pattern>`` that compiles."""
    if value.startswith("re:"):
        try:
            re.compile(value[3:])
        except re.error as err:
            return [f"data.group_by: {value!r} is not a valid regex ({err})"]
        return [] if value[3:] else ["data.group_by: re: needs a pattern after it"]
    if value in ("auto", "none", *GROUP_FIELDS) or (value.startswith("meta.") and value[5:]):
        return []
    allowed = f"auto, none, {', '.join(GROUP_FIELDS)}, meta.<column>, re:<pattern>"
    return [f"data.group_by: {value!r} is not one of {allowed}"]


@dataclass
class PromptConfig:
    name: str = MISSING
    kind: str = MISSING  # chat | jinja
    system: Optional[str] = MISSING
    template: Optional[str] = MISSING
    template_file: Optional[str] = MISSING  # a Jinja file that replaces `template`
    train_on: str = MISSING  # all_assistant | last_assistant (multi-turn conversations)
    k_shot: int = MISSING
    shot_seed: int = MISSING
    eval_k_shot: int = MISSING  # > 0: render also writes test_kshot.jsonl, the base model's k-shot arm
    max_length: Any = MISSING  # tokens, or "auto": the train split's 99th percentile, capped by the model's context
    overflow: str = MISSING  # truncate | drop
    truncate_side: str = MISSING  # end | middle: where truncation cuts the user content

    def problems(self) -> list[str]:
        out = _choice("prompt.kind", self.kind, ("chat", "jinja"))
        out += _choice("prompt.overflow", self.overflow, ("truncate", "drop"))
        out += _choice("prompt.truncate_side", self.truncate_side, ("end", "middle"))
        out += _choice("prompt.train_on", self.train_on, ("all_assistant", "last_assistant"))
        if self.kind == "jinja" and not (self.template or self.template_file):
            out.append("prompt.template: required when prompt.kind=jinja (or set prompt.template_file)")
        out += _int_at_least("prompt.k_shot", self.k_shot, 0)
        out += _int_at_least("prompt.eval_k_shot", self.eval_k_shot, 0)
        if self.max_length != "auto":
            out += ([] if isinstance(self.max_length, int) and not isinstance(self.max_length, bool) else
                    [f"prompt.max_length: must be an integer or auto (got {self.max_length!r})"]) or \
                _int_at_least("prompt.max_length", self.max_length, 8)
        out += _seed("prompt.shot_seed", self.shot_seed)
        return out


@dataclass
class LoraConfig:
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: list[str] = MISSING

    def problems(self, where: str) -> list[str]:
        out = _int_at_least(f"{where}.r", self.r, 1) + _int_at_least(f"{where}.alpha", self.alpha, 1)
        out += _number(f"{where}.dropout", self.dropout, low=0, high=1, high_open=True)
        if not self.target_modules or not all(self.target_modules):
            out.append(f"{where}.target_modules: list at least one module name (no empty names)")
        return out


@dataclass
class FinetuneConfig:
    method: str = MISSING  # lora | full
    lora: Optional[LoraConfig] = MISSING

    def problems(self) -> list[str]:
        out = _choice("finetune.method", self.method, ("lora", "full"))
        if self.method == "lora" and self.lora is None:
            out.append("finetune.lora: required when finetune.method=lora")
        elif self.method == "lora" and self.lora is not None:
            out += self.lora.problems("finetune.lora")
        return out


@dataclass
class StrategyConfig:
    """How Lightning spreads one run over devices; built by :func:`pipeline.training.strategies.build`."""

    name: str = MISSING  # auto | ddp | fsdp
    process_group_backend: Optional[str] = MISSING  # null: nccl on GPUs, gloo on CPUs
    auto_wrap: list[str] = MISSING  # fsdp: dotted class paths of the layers FSDP shards one by one
    sharding: str = MISSING  # fsdp: FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD

    def problems(self) -> list[str]:
        out = []
        if self.name not in STRATEGIES:
            out.append(f"trainer.strategy.name: {self.name!r} is not one of {', '.join(STRATEGIES)}")
        if self.name == "fsdp" and not self.auto_wrap:
            out.append("trainer.strategy.auto_wrap: fsdp needs at least one layer class to wrap")
        out += [f"trainer.strategy.auto_wrap: {p!r} is not a dotted class path (package.module.Class)"
                for p in self.auto_wrap if not DOTTED_PATH.match(str(p))]
        out += _choice("trainer.strategy.sharding", self.sharding, FSDP_SHARDING)
        return out


STRATEGIES = ("auto", "ddp", "fsdp")
BATCHING = ("auto", "dynamic", "length_grouped", "packed")


@dataclass
class TrainerConfig:
    accelerator: str = MISSING
    devices: int = MISSING
    strategy: StrategyConfig = MISSING
    precision: str = MISSING
    batch_size: int = MISSING
    accumulate_grad_batches: int = MISSING
    max_steps: int = MISSING
    max_epochs: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_ratio: float = MISSING
    gradient_clip_val: Optional[float] = MISSING
    val_check_interval: int = MISSING
    log_every_n_steps: int = MISSING
    num_workers: int = MISSING
    # Throughput: how rows become batches, and whether to torch.compile the model.
    batching: str = MISSING  # auto | dynamic | length_grouped | packed (auto: packed where it is exact)
    pack_length: Any = MISSING  # token budget of one packed row, or auto: batch_size x mean train row length
    compile: bool = MISSING
    # Memory (see pipeline/training/plan.py): each optimizer step's rows in this many forward passes,
    # gradients accumulated (auto: as few as keep a pass's measured activations within
    # activation_budget_mb); then recompute activations in the backward pass (true), never (false), or
    # when a pass still passes the budget (auto).
    micro_batches: Any = MISSING
    gradient_checkpointing: Any = MISSING
    activation_budget_mb: int = MISSING

    def problems(self) -> list[str]:
        out = []
        out += _choice("trainer.batching", self.batching, BATCHING)
        if not (isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto"):
            out.append(f"trainer.gradient_checkpointing: {self.gradient_checkpointing!r} is not one of true, false, "
                       "auto")
        out += _choice("trainer.accelerator", self.accelerator, ACCELERATORS)
        out += _choice("trainer.precision", self.precision, PRECISIONS)
        for name in ("pack_length", "micro_batches"):
            value = getattr(self, name)
            if value != "auto":
                out += _int_or_auto(f"trainer.{name}", value) or _int_at_least(f"trainer.{name}", value, 1)
        for name in ("batch_size", "accumulate_grad_batches", "max_steps", "val_check_interval", "devices",
                     "log_every_n_steps", "activation_budget_mb"):
            out += _int_at_least(f"trainer.{name}", getattr(self, name), 1)
        if self.max_epochs != -1:  # -1: no epoch limit (max_steps decides), as in Lightning
            out += _int_at_least("trainer.max_epochs", self.max_epochs, 1, " (or -1 for no limit)")
        out += _int_at_least("trainer.num_workers", self.num_workers, 0)
        out += _number("trainer.warmup_ratio", self.warmup_ratio, low=0, high=1, high_open=True)
        out += _number("trainer.lr", self.lr, low=0, low_open=True)
        out += _number("trainer.weight_decay", self.weight_decay, low=0)
        if self.gradient_clip_val is not None:  # 0 or null: no clipping
            out += _number("trainer.gradient_clip_val", self.gradient_clip_val, low=0)
        return out + self.strategy.problems()


@dataclass
class BootstrapConfig:
    n_resamples: int = MISSING
    seed: int = MISSING


# The evaluated arms: the base model zero-shot, the base model k-shot, the fine-tuned model,
# and the encoder classifier train_encoder trained (classification tasks only).
# "aligned" is the align stage's DPO model, scored when align.enabled (models/aligned is no marker).
MODELS = ("base", "base_kshot", "tuned", "aligned", "encoder")


@dataclass
class EvalConfig:
    models: list[str] = MISSING
    batch_size: int = MISSING
    decode_batch_size: int = MISSING  # rows decoded together; prefill runs batch_size at a time
    max_new_tokens: dict[str, int] = MISSING
    stop_strings: list[str] = MISSING
    max_examples: Optional[int] = MISSING
    bootstrap: BootstrapConfig = MISSING
    task_types: dict[str, str] = MISSING  # task -> task type, overriding the data's
    slices: list[str] = MISSING  # task | source | input_length | any example field | meta.<column>
    length_buckets: list[int] = MISSING  # word-count edges of the input_length slice

    def problems(self) -> list[str]:
        out = [f"eval.models: unknown model {m!r} (use {', '.join(MODELS)})" for m in self.models if m not in MODELS]
        if not self.models:
            out.append(f"eval.models: list at least one of {', '.join(MODELS)}")
        if list(self.length_buckets) != sorted(set(self.length_buckets)):
            out.append("eval.length_buckets: must be strictly increasing")
        out += [f"eval.max_new_tokens.{t}: missing" for t in TASK_TYPES if t not in self.max_new_tokens]
        out += [f"eval.max_new_tokens.{t}: not a task type (use {', '.join(TASK_TYPES)})"
                for t in self.max_new_tokens if t not in TASK_TYPES]
        for task_type, budget in self.max_new_tokens.items():
            out += _int_at_least(f"eval.max_new_tokens.{task_type}", budget, 1)
        if any(b < 1 for b in self.length_buckets):
            out.append("eval.length_buckets: word counts must be >= 1")
        if not all(self.stop_strings):
            out.append("eval.stop_strings: an empty stop string would end every answer at once")
        out += _seed("eval.bootstrap.seed", self.bootstrap.seed)
        for task, task_type in self.task_types.items():
            out += _choice(f"eval.task_types.{task}", task_type, TASK_TYPES)
        if self.batch_size < 1:
            out.append("eval.batch_size: must be >= 1")
        if self.decode_batch_size < 1:
            out.append("eval.decode_batch_size: must be >= 1")
        if self.bootstrap.n_resamples < 1:
            out.append("eval.bootstrap.n_resamples: must be >= 1")
        if self.max_examples is not None and self.max_examples < 1:
            out.append("eval.max_examples: must be >= 1 or null")
        return out


@dataclass
class SafetyConfig:
    """Rule lists (paths relative to the repository root) and an optional classifier hook."""

    keywords_file: str = MISSING
    regex_file: str = MISSING
    classifier: Optional[dict[str, Any]] = MISSING  # {_target_: module.fn}: text -> reason or None

    def problems(self) -> list[str]:
        if self.classifier is not None and "_target_" not in self.classifier:
            return ["safety.classifier: needs a _target_ (a callable text -> reason or None), or null"]
        if self.classifier is not None and not DOTTED_PATH.match(str(self.classifier["_target_"])):
            return [f"safety.classifier._target_: {self.classifier['_target_']!r} is not a dotted path (module.function)"]
        return []


@dataclass
class EncoderConfig:
    """The encoder arm: a classifier train_encoder fine-tunes on the same prepared splits as the causal LM."""

    enabled: bool = MISSING
    model: ModelConfig = MISSING  # the same keys as ``model``; kind must be sequence_classification
    include_instruction: bool = MISSING
    max_length: int = MISSING
    finetune: FinetuneConfig = MISSING
    trainer: TrainerConfig = MISSING

    def problems(self) -> list[str]:
        if not self.enabled:
            return []
        inner = self.model.problems() + self.finetune.problems() + self.trainer.problems()
        out = [f"encoder.{p}" for p in inner]
        if self.model.kind != "sequence_classification":
            out.append(f"encoder.model.kind: {self.model.kind!r}; the encoder arm is a sequence_classification model")
        if self.finetune.method != "full":
            out.append("encoder.finetune.method: the encoder arm trains all weights; use full")
        if self.trainer.batching not in ("dynamic", "length_grouped"):
            out.append(f"encoder.trainer.batching: {self.trainer.batching!r}; the encoder arm batches rows as they are "
                       "(packing is for causal LMs): use dynamic or length_grouped")
        out += _fixed_memory_plan("encoder.trainer", self.trainer)
        if isinstance(self.trainer.devices, int) and self.trainer.devices > 1:
            out.append(f"encoder.trainer.devices: {self.trainer.devices}; the encoder arm (a small model) trains on "
                       "one device, whatever the causal LM uses")
        out += _int_at_least("encoder.max_length", self.max_length, 8)
        return out


ALIGN_SOURCES = ("embedded", "file")
PREFERENCE_FORMATS = ("auto", "standard", "conversational", "hh_rlhf")


@dataclass
class AlignDataConfig:
    source: str = MISSING  # embedded | file
    path: Optional[str] = MISSING
    format: str = MISSING  # auto | standard | conversational | hh_rlhf
    test_fraction: float = MISSING
    val_fraction: float = MISSING
    max_pairs: Optional[int] = MISSING
    max_val_pairs: int = MISSING


@dataclass
class AlignConfig:
    """Preference tuning (DPO) after instruction tuning: the align stage and the aligned arm."""

    enabled: bool = MISSING
    beta: float = MISSING
    label_smoothing: float = MISSING
    data: AlignDataConfig = MISSING
    trainer: TrainerConfig = MISSING

    def problems(self) -> list[str]:
        if not self.enabled:
            return []
        d = self.data
        out = [f"align.{p}" for p in self.trainer.problems()]
        out += _number("align.beta", self.beta, low=0, low_open=True)
        out += _number("align.label_smoothing", self.label_smoothing, low=0, high=0.5, high_open=True)
        out += _choice("align.data.source", d.source, ALIGN_SOURCES)
        out += _choice("align.data.format", d.format, PREFERENCE_FORMATS)
        if d.source == "file" and not d.path:
            out.append("align.data.path: source=file needs the path of a preference file")
        for name in ("test_fraction", "val_fraction"):
            out += _number(f"align.data.{name}", getattr(d, name), low=0, high=0.5)
        if d.max_pairs is not None:
            out += _int_at_least("align.data.max_pairs", d.max_pairs, 1)
        out += _int_at_least("align.data.max_val_pairs", d.max_val_pairs, 1)
        if self.trainer.batching != "dynamic":
            out.append("align.trainer.batching: a pair's two sequences share a batch; use dynamic")
        out += _fixed_memory_plan("align.trainer", self.trainer)
        if self.trainer.compile:
            out.append("align.trainer.compile: not supported by the align stage; use false")
        if self.trainer.devices > 1:
            out.append(f"align.trainer.devices: {self.trainer.devices}; the align stage runs in one process "
                       "(one device) for now")
        return out


@dataclass
class ExportConfig:
    """The export stage's merged checkpoint and the registry name promote uses."""

    enabled: bool = MISSING
    registered_model: Optional[str] = MISSING  # null: tracking.experiment
    check_rows: int = MISSING  # test rows the merged-vs-adapter logits check runs on
    atol: float = MISSING  # largest allowed |merged - adapter| logit (fp32)

    def problems(self) -> list[str]:
        out = _int_at_least("export.check_rows", self.check_rows, 1)
        out += _number("export.atol", self.atol, low=0, low_open=True)
        if self.registered_model is not None:
            out += _nonempty("export.registered_model", self.registered_model)
        return out


@dataclass
class TrackingConfig:
    experiment: str = MISSING

    def problems(self) -> list[str]:
        return _nonempty("tracking.experiment", self.experiment)


@dataclass
class PipelineConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    prompt: PromptConfig = MISSING
    finetune: FinetuneConfig = MISSING
    trainer: TrainerConfig = MISSING
    eval: EvalConfig = MISSING
    encoder: EncoderConfig = MISSING
    align: AlignConfig = MISSING
    safety: SafetyConfig = MISSING
    seed: int = MISSING
    tracking: TrackingConfig = MISSING
    export: ExportConfig = MISSING


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> list[str]:
    return [] if value in allowed else [f"{key}: {value!r} is not one of {', '.join(allowed)}"]


def _fixed_memory_plan(key: str, t: "TrainerConfig") -> list[str]:
    """The encoder and align stages run one forward pass per batch without recomputation: settings
    that would ask for more are refused, not ignored."""
    out = []
    if t.micro_batches != 1:
        out.append(f"{key}.micro_batches: {t.micro_batches!r}; this stage runs one pass per batch: use 1")
    if t.gradient_checkpointing is not False:
        out.append(f"{key}.gradient_checkpointing: {t.gradient_checkpointing!r}; not supported here: use false")
    return out


def _int_or_auto(key: str, value: Any) -> list[str]:
    ok = isinstance(value, int) and not isinstance(value, bool)
    return [] if ok else [f"{key}: must be an integer or auto (got {value!r})"]


def _int_at_least(key: str, value: int, low: int, note: str = "") -> list[str]:
    return [] if value >= low else [f"{key}: must be >= {low}{note} (got {value})"]


def _seed(key: str, value: int) -> list[str]:
    low, high = SEED_RANGE
    return [] if low <= value <= high else [f"{key}: must be in [{low}, {high}] (got {value})"]


def _nonempty(key: str, value: str) -> list[str]:
    return [] if value and value.strip() else [f"{key}: must not be empty"]


def _number(key: str, value: float, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> list[str]:
    """A finite number within the bounds (an open bound excluded); NaN and infinities never pass."""
    ok = math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if ok:
        return []
    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"{'>' if low_open else '>='} {low:g}"
    else:
        bounds = f"{'<' if high_open else '<='} {high:g}"
    return [f"{key}: must be {bounds} and finite (got {value!r})"]


def _kind_problems(cfg: PipelineConfig) -> list[str]:
    """The pipeline fine-tunes a causal LM; an encoder classifier is the encoder arm beside it."""
    if cfg.model.kind == "causal_lm":
        return []
    return [f"model.kind: {cfg.model.kind!r}; the pipeline fine-tunes a causal LM. An encoder classifier runs as "
            "the encoder arm beside it: encoder=minilm, or encoder.model.path=ID"]


def _merge_problem(err: OmegaConfBaseException, raw: Mapping[str, Any]) -> str:
    """OmegaConf's error as one ``key: message`` line (its message goes on with full_key/object_type lines).

    An error inside a ``data.sources`` item names the key within the item only; the
    item is found by merging each one alone.
    """
    key = getattr(err, "full_key", None) or ""
    message = str(getattr(err, "msg", None) or err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    sources = (raw.get("data") or {}).get("sources") if isinstance(raw.get("data"), Mapping) else None
    if key and "." not in key and isinstance(sources, list) and key not in PipelineConfig.__dataclass_fields__:
        for i, item in enumerate(sources):
            try:
                OmegaConf.merge(OmegaConf.structured(SourceConfig), item)
            except OmegaConfBaseException:
                key = f"data.sources[{i}].{key}"
                break
    return f"{key}: {message}" if key else message


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys still ``???`` in a structured config."""
    out = []
    for key in node:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            out.append(f"{path}: missing")
        elif OmegaConf.is_dict(node[key]) and OmegaConf.get_type(node[key]) not in (dict, None):
            out += _missing_keys(node[key], path + ".")
    return out


def from_mapping(raw: Mapping[str, Any], source: str = "config") -> PipelineConfig:
    """Validate a composed config mapping and return it typed; raise one ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), raw)
    except OmegaConfBaseException as err:  # unknown key or wrong type: name the key
        raise ConfigError([_merge_problem(err, raw)], source) from None
    problems = _missing_keys(merged)
    if problems:
        raise ConfigError(problems, source)
    cfg: PipelineConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    for section in (cfg.model, cfg.data, cfg.prompt, cfg.finetune, cfg.trainer, cfg.eval, cfg.encoder,
                    cfg.align, cfg.safety, cfg.tracking, cfg.export):
        problems += section.problems()
    problems += _seed("seed", cfg.seed)
    problems += _kind_problems(cfg)
    if "base_kshot" in cfg.eval.models and cfg.prompt.eval_k_shot < 1:
        problems.append("eval.models: base_kshot needs prompt.eval_k_shot >= 1 (the number of exemplars)")
    if problems:
        raise ConfigError(problems, source)
    return cfg


def check_job_dir(job_dir: str | Path, *protected: Path) -> Path:
    """``job_dir`` (Hydra's ``hydra.run.dir`` / ``hydra.sweep.dir`` + subdir), refused when it is one of
    ``protected`` (the repository, the launch directory) or holds one: a job replaces its
    ``checkpoints/`` and ``models/`` there, which would delete the DVC outputs of the repository."""
    path = Path(job_dir).resolve()
    for other in protected:
        other = Path(other).resolve()
        if path == other or path in other.parents:
            raise ConfigError([f"hydra.run.dir/hydra.sweep.dir: the job directory {path} is or contains {other}; "
                               "a job would replace its checkpoints/ and models/ (use a fresh directory, e.g. the "
                               "default outputs/...)"], "the Hydra config")
    return Path(job_dir)


def load(path: str | Path = "params.yaml") -> PipelineConfig:
    """Read a composed params file with a safe YAML loader and validate it."""
    return read(path)[0]


def read(path: str | Path = "params.yaml") -> tuple[PipelineConfig, dict[str, Any]]:
    """:func:`load`, and the params as the file has them (what a stage logs and saves)."""
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    return from_mapping(raw, source=str(path)), raw


def to_dict(obj: Any) -> Any:
    """Dataclass config -> plain dict (for saving next to weights, logging)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the dotted names DVC uses for params."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


__all__ = [
    "AlignConfig", "AlignDataConfig", "BootstrapConfig", "ConfigError", "DataConfig", "DedupConfig", "EncoderConfig", "ExportConfig", "SourceConfig", "EvalConfig", "FinetuneConfig", "LoraConfig",
    "ModelConfig", "PipelineConfig", "PromptConfig", "SafetyConfig", "TrackingConfig", "TrainerConfig",
    "check_job_dir", "flatten", "from_mapping", "load", "read", "to_dict",
]
