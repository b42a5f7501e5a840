"""The MLflow Model Registry side of a shipped model: which run a promotion means, whether its
export is that run's, how it compares with the current champion, and the registration itself.

- A candidate is a training run (the one train opened and evaluate scored). Its export is the
  folder whose ``source.json`` holds the digest train tagged the run with
  (:data:`~pipeline.tracking.stage_run.DIGEST_TAG`): never a run id in a DVC output.
- :func:`paired_gain` compares two runs' tuned answers on the same test examples, paired by id,
  from the ``eval/predictions.jsonl`` and ``eval/intervals.json`` evaluate logged: the overall
  score (the mean of the tasks' primary metrics, as evaluate's) with a stratified paired bootstrap
  whose resamples come from :func:`pipeline.evaluation.scoring.task_indices`. Two runs whose test
  examples or references differ are not compared.
- :func:`register` logs the export once, with the ``transformers`` flavour (``llm/v1/chat``: a
  text-generation pipeline that takes chat messages and applies the saved chat template), into
  the candidate's run, registers it, tags the version with its lineage and sets an alias.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.evaluation import resampling as R
from pipeline.evaluation import scoring
from pipeline.tracking.stage_run import DIGEST_TAG, JOB_TAG

CHAMPION = "champion"
LINEAGE_TAGS = ("git.commit", "git.dirty", "data.hash", "template.hash", "dvc.exp_name", "sweep.id")
# Per-example score that each task type's primary metric is the mean of.
PRIMARY_SCORE = {t: scoring.BINARY.get(m, m) for t, m in scoring.PRIMARY.items()}


class PromotionRefused(PipelineError):
    """The candidate is not shown better than the champion (or cannot be compared with it)."""


@dataclass(frozen=True)
class Evaluation:
    """What evaluate logged into a run that promote needs: the per-example rows and the intervals."""

    rows: list[dict[str, Any]]
    intervals: dict[str, Any]


def export_dir(run: Any, repo_root: Path, given: Path | None = None) -> Path:
    """The export folder of ``run``: ``given``, else the Hydra job's ``models/export``, else the
    repository's; refused unless its ``source.json`` names the model the run trained."""
    job = run.data.tags.get(JOB_TAG)
    folder = given or (Path(job) if job else repo_root) / "models" / "export"
    source = folder / "source.json"
    if not source.exists():
        raise PipelineError(f"promote: no export in {folder} (no source.json); run the export stage "
                            "(`dvc repro export`), or pass --export DIR")
    digest = json.loads(source.read_text(encoding="utf-8"))["tuned_digest"]
    if digest != run.data.tags.get(DIGEST_TAG):
        hint = f"`dvc exp apply {run.data.tags['dvc.exp_name']}` first, " if run.data.tags.get("dvc.exp_name") else ""
        raise PipelineError(f"promote: {folder} holds the export of another model than run {run.info.run_id} "
                            f"trained ({DIGEST_TAG} differs); {hint}or pass --export DIR")
    return folder


def evaluation(uri: str, run_id: str) -> Evaluation:
    """The run's ``eval/predictions.jsonl`` and ``eval/intervals.json`` (downloaded from its artifacts)."""
    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory() as tmp:
        try:
            preds = download_artifacts(run_id=run_id, artifact_path="eval/predictions.jsonl", dst_path=tmp,
                                       tracking_uri=uri)
            inter = download_artifacts(run_id=run_id, artifact_path="eval/intervals.json", dst_path=tmp,
                                       tracking_uri=uri)
        except Exception as err:  # noqa: BLE001 - MLflow raises its own, OSError, ...: all mean "not evaluated"
            raise PromotionRefused(f"promote: run {run_id} has no evaluation (eval/predictions.jsonl, "
                                   f"eval/intervals.json): {type(err).__name__}; run the evaluate stage") from None
        rows = [json.loads(line) for line in Path(preds).read_text(encoding="utf-8").splitlines() if line.strip()]
        return Evaluation(rows, json.loads(Path(inter).read_text(encoding="utf-8")))


def headline(intervals: Mapping[str, Any]) -> dict[str, Any] | None:
    """Tuned minus base on the overall score, with its interval, as evaluate reported it."""
    try:
        return dict(intervals["intervals"]["delta"]["overall"]["score"])
    except (KeyError, TypeError):
        return None


def _scores(ev: Evaluation) -> dict[str, dict[str, float]]:
    """task -> example id -> the tuned model's primary per-example score."""
    types = ev.intervals.get("task_types", {})
    out: dict[str, dict[str, float]] = {}
    for r in ev.rows:
        if "tuned_scores" not in r:
            raise PromotionRefused("promote: the run's evaluation has no tuned answers (eval.models without tuned)")
        out.setdefault(r["task"], {})[r["id"]] = float(r["tuned_scores"][PRIMARY_SCORE[types[r["task"]]]])
    return out


def same_split(a: Evaluation, b: Evaluation) -> bool:
    """True when both runs scored the same examples (ids) against the same references."""
    return {r["id"]: r["reference"] for r in a.rows} == {r["id"]: r["reference"] for r in b.rows}


def paired_gain(candidate: Evaluation, champion: Evaluation, n_resamples: int, seed: int) -> dict[str, Any]:
    """Candidate minus champion on the overall score: point, 95% paired bootstrap interval, p-value."""
    if not same_split(candidate, champion):
        raise PromotionRefused("promote: the candidate and the champion were evaluated on different test "
                               "examples or references (another data config or data hash); they cannot be paired")
    cand, champ = _scores(candidate), _scores(champion)
    ids = {t: sorted(cand[t]) for t in cand}
    idx = scoring.task_indices({t: len(v) for t, v in ids.items()}, n_resamples, seed)
    point, resampled = 0.0, np.zeros(n_resamples)
    for t, keys in ids.items():
        diff = np.array([cand[t][k] - champ[t][k] for k in keys])
        point += float(diff.mean()) / len(ids)
        resampled += R.mean_of(list(diff), idx[t]) / len(ids)
    return {**R.paired(point, resampled), "n": sum(len(v) for v in ids.values())}


def lineage(run: Any, gain: Mapping[str, Any] | None) -> dict[str, str]:
    """The version's tags: the run, its commit, data and template, and the headline gain over base."""
    tags = {k: run.data.tags[k] for k in LINEAGE_TAGS if k in run.data.tags}
    tags["run_id"] = run.info.run_id
    for key in ("delta", "low", "high", "p_value", "n", "test"):
        if gain and key in gain:
            tags[f"eval.tuned_minus_base.{key}"] = str(gain[key])
    return tags


def requirements() -> list[str]:
    """What the served model needs, pinned to the versions that exported it. Given explicitly: MLflow's
    default list for torch models names torchvision, which this project does not install, and
    inferring them loads the model a second time in a subprocess."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "transformers", "torch", "tokenizers", "safetensors",
                                            "accelerate") if _installed(p)]


def _installed(package: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return bool(version(package))
    except PackageNotFoundError:
        return False


def champion(client: Any, name: str) -> Any | None:
    """The version that holds the :data:`CHAMPION` alias of ``name``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such model, or no such alias yet
        return None


def register(uri: str, run: Any, folder: Path, name: str, tags: Mapping[str, str],
             generation: Mapping[str, Any], example: Mapping[str, Any]) -> Any:
    """Log ``folder`` (a Hugging Face checkpoint, loaded in fp32) once into ``run`` as a ``transformers`` model for
    chat, with ``generation`` as its generation defaults, register it as a new version of ``name``, tag it
    and return it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs as mlf

    from pipeline.core.models import load_causal_lm, load_tokenizer

    # The components, not the folder's path: MLflow 3.17's local-checkpoint path reads the task's
    # pipeline class from transformers' task table, which transformers 5 no longer holds as classes.
    components = {"model": load_causal_lm(folder), "tokenizer": load_tokenizer(folder)}
    # The serving defaults go into the saved generation config: MLflow would log a model_config as
    # params of the training run.
    components["model"].generation_config.update(**generation)
    with mlf.active_run(uri, run.info.run_id):
        info = mlflow.transformers.log_model(components, name="model", task="llm/v1/chat",
                                             input_example=dict(example),
                                             registered_model_name=name, await_registration_for=300,
                                             pip_requirements=requirements())
    tag_version(uri, name, str(info.registered_model_version), tags)
    return MlflowClient(uri).get_model_version(name, str(info.registered_model_version))


def tag_version(uri: str, name: str, version: str, tags: Mapping[str, str]) -> None:
    """Set ``tags`` on a model version."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs as mlf

    client = MlflowClient(uri)
    mlf.locked_write(uri, lambda: [client.set_model_version_tag(name, version, k, v) for k, v in tags.items()])


def version_of(client: Any, name: str, run_id: str) -> Any | None:
    """The version of ``name`` registered from ``run_id`` (the newest, if several), or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:  # no such registered model yet
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def crown(uri: str, name: str, version: str) -> None:
    """Move the :data:`CHAMPION` alias of ``name`` to ``version``."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs as mlf

    mlf.locked_write(uri, lambda: MlflowClient(uri).set_registered_model_alias(name, CHAMPION, version))
