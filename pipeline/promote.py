"""``python -m pipeline.promote``: register a run's exported model and make it the champion, on evidence.

Which run: ``--run-id``, ``--exp`` (a DVC experiment's name: its newest run), ``--sweep`` (a
sweep's parent run id: its best child by the sweep's own metric), or by default the run that
trained the model in ``models/export`` (the workspace's last ``dvc repro`` / ``dvc exp run``).
Its export is that run's job folder's ``models/export`` (the Hydra app) or the repository's,
or ``--export DIR``; promote refuses a folder that another model was exported from.

The candidate must beat the current champion (alias ``champion`` of ``export.registered_model``,
default ``tracking.experiment``) on the same test examples: the 95% paired interval of the
overall score's difference, from both runs' per-example scores (``eval/predictions.jsonl``),
must lie above zero. Otherwise promote says why and exits 1 (``--force`` registers anyway).
Registering logs the merged model once into the candidate's run (MLflow's ``transformers``
flavour for chat), tags the version with its commit, data hash, template hash and its tuned-minus-
base gain with interval, and moves the alias. Serve it with
``mlflow models serve -m models:/NAME@champion --env-manager local`` (docs/export.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.core import config
from pipeline.core.errors import PipelineError
from pipeline.core.files import read_json
from pipeline.tracking import registry
from pipeline.tracking import runs as mlf
from pipeline.tracking.stage_run import DIGEST_TAG, find_model_run

EXAMPLE = {"messages": [{"role": "user", "content": "Give one word that describes the sea."}], "max_tokens": 8}


@dataclass(frozen=True)
class Selection:
    """Which run to promote, and how."""

    run_id: str | None = None
    exp: str | None = None
    sweep: str | None = None
    export: Path | None = None
    name: str | None = None
    force: bool = False


def candidate_run(client: Any, uri: str, cfg: config.PipelineConfig, sel: Selection, repo_root: Path) -> Any:
    """The training run ``sel`` names (see the module docstring)."""
    if sel.run_id:
        return client.get_run(sel.run_id)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        raise PipelineError(f"promote: no MLflow experiment {cfg.tracking.experiment!r} in this store")
    if sel.exp:
        # The experiment's training run: it carries the model digest and no `arm` tag (the encoder
        # and align stages log their own runs under the same experiment name).
        found = [r for r in client.search_runs([exp.experiment_id], f"tags.`dvc.exp_name` = '{sel.exp}'",
                                               order_by=["attributes.start_time DESC"], max_results=50)
                 if DIGEST_TAG in r.data.tags and "arm" not in r.data.tags]
        if not found:
            raise PipelineError(f"promote: no run of DVC experiment {sel.exp!r} in {cfg.tracking.experiment!r}")
        return found[0]
    if sel.sweep:
        return _best_child(client, sel.sweep, uri)
    source = (sel.export or repo_root / "models" / "export") / "source.json"
    if not source.exists():
        raise PipelineError(f"promote: {source} does not exist; run the export stage or name a run (--run-id)")
    run_id = find_model_run(client, cfg.tracking.experiment, str(read_json(source)["tuned_digest"]))
    if run_id is None:
        raise PipelineError(f"promote: no run in {cfg.tracking.experiment!r} trained the model exported in "
                            f"{source.parent}; name one with --run-id")
    return client.get_run(run_id)


def _best_child(client: Any, parent_id: str, uri: str) -> Any:
    """The sweep's best child run by the metric and direction the sweep was run with."""
    from pipeline.tracking.sweeps import Objective

    params = client.get_run(parent_id).data.params
    if "sweep.metric" not in params:
        raise PipelineError(f"promote: run {parent_id} is not a sweep's parent run (no sweep.metric param)")
    objective = Objective(params["sweep.metric"], params["sweep.direction"])
    children = {r.info.run_id: r for r in mlf.child_runs(uri, parent_id)}
    best = objective.best({k: r.data.metrics[objective.run_metric] for k, r in children.items()
                           if objective.run_metric in r.data.metrics})
    if best is None:
        raise PipelineError(f"promote: no child of sweep run {parent_id} has {objective.metric}")
    return children[best[0]]


def verdict(uri: str, cfg: config.PipelineConfig, cand: registry.Evaluation, current: Any) -> dict[str, Any] | None:
    """Candidate minus champion (None without a champion); refused unless its interval is above zero."""
    if current is None:
        return None
    gain = registry.paired_gain(cand, registry.evaluation(uri, current.run_id),
                                cfg.eval.bootstrap.n_resamples, cfg.eval.bootstrap.seed)
    print(f"promote: candidate - champion (version {current.version}) on the overall score: "
          f"{gain['delta']:+.4f}, 95% CI [{gain['low']:+.4f}, {gain['high']:+.4f}], p {gain['p_value']:.3g}, "
          f"n {gain['n']}", flush=True)
    return gain


def run(cfg: config.PipelineConfig, sel: Selection, uri: str, repo_root: Path) -> dict[str, Any]:
    """Pick, check, compare, register (once per run), crown; return what was done."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    cand = candidate_run(client, uri, cfg, sel, repo_root)
    if cand.info.status != "FINISHED":
        raise PipelineError(f"promote: run {cand.info.run_id} is {cand.info.status}; only a finished run "
                            "(trained and evaluated) can be promoted")
    folder = registry.export_dir(cand, repo_root, sel.export)
    name = sel.name or cfg.export.registered_model or cfg.tracking.experiment
    current = registry.champion(client, name)
    if current is not None and current.run_id == cand.info.run_id:
        print(f"promote: run {cand.info.run_id} is already {name}@{registry.CHAMPION} (version {current.version})")
        return {"version": str(current.version), "registered": False}
    evaluated = registry.evaluation(uri, cand.info.run_id)
    gain = _judge(uri, cfg, evaluated, current, cand.info.run_id, name, sel.force)
    headline = registry.headline(evaluated.intervals)
    if headline is None:
        print("promote: warning: eval/intervals.json has no tuned - base overall difference; the version gets "
              "no eval.tuned_minus_base tags", file=sys.stderr, flush=True)
    tags = registry.lineage(cand, headline)
    tags.update({f"promote.vs_champion.{k}": str(gain[k]) for k in ("delta", "low", "high", "p_value", "n")} if gain
                else {})
    tags["promote.forced"] = str(bool(gain is not None and not gain["low"] > 0)).lower()
    existing = registry.version_of(client, name, cand.info.run_id)
    if existing is not None:  # registered before (then dethroned): the alias goes back, no second copy
        registry.tag_version(uri, name, str(existing.version), tags)
        version, registered = str(existing.version), False
    else:
        generation = {"do_sample": False, "max_new_tokens": max(cfg.eval.max_new_tokens.values())}
        version = str(registry.register(uri, cand, folder, name, tags, generation, EXAMPLE).version)
        registered = True
    registry.crown(uri, name, version)
    print(f"promote: {folder} -> models:/{name}/{version} = {name}@{registry.CHAMPION} "
          f"(run {cand.info.run_id})", flush=True)
    return {"version": version, "registered": registered, "gain_vs_champion": gain}


def _judge(uri: str, cfg: config.PipelineConfig, evaluated: registry.Evaluation, current: Any, run_id: str,
           name: str, force: bool) -> dict[str, Any] | None:
    """The paired gain over the champion; refused (unless ``force``) when its interval is not above zero."""
    gain = verdict(uri, cfg, evaluated, current)
    if gain is not None and not gain["low"] > 0:
        why = (f"the candidate (run {run_id}) is not better than {name}@{registry.CHAMPION} (version "
               f"{current.version}, run {current.run_id}) beyond the paired 95% interval: "
               f"{gain['delta']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]")
        if not force:
            raise registry.PromotionRefused(f"promote: {why}; --force registers it anyway")
        print(f"promote: --force: {why}", flush=True)
    return gain


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the composed config")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run-id", help="the MLflow run (train's) to promote")
    which.add_argument("--exp", help="a DVC experiment's name: its newest run")
    which.add_argument("--sweep", help="a sweep's parent run id: its best child by the sweep's metric")
    parser.add_argument("--export", type=Path, help="the export folder (default: the run's own)")
    parser.add_argument("--name", help="registered model name (default: export.registered_model)")
    parser.add_argument("--force", action="store_true", help="register even when not shown better")
    args = parser.parse_args(argv)
    sel = Selection(args.run_id, args.exp, args.sweep, args.export, args.name, args.force)
    run(config.load(args.params), sel, mlf.default_uri(Path.cwd()), Path.cwd())
    return 0


if __name__ == "__main__":
    from pipeline.core.cli import guard

    sys.exit(guard("promote", main))
