"""One stage's MLflow run: opened before the work that can fail, closed with an honest status,
and found again by the model it trained.

- :func:`closing` ends a run FINISHED when its block returns, KILLED on SIGTERM or Ctrl-C
  (and turns Lightning's ``SystemExit(0)`` for SIGTERM into exit code 143, so that DVC
  never takes a stopped stage for a finished one), FAILED on anything else.
- :func:`sigterm_outside` makes SIGTERM outside ``Trainer.fit`` (loading, saving, logging)
  stop the stage the same way; inside fit, Lightning's own handler stops at the next batch.
- A trained model's run id is not written into the model's folder: the folder is a DVC
  output, and a run id differs on every run, so the folder's hash (and ``dvc.lock``) would
  too. Train tags its run with the folder's content digest (:data:`DIGEST_TAG`) and
  evaluate finds the run by it (:func:`find_model_run`).
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

DIGEST_TAG = "pipeline.model_digest"
JOB_TAG = "hydra.job_dir"  # the Hydra app's job folder (absent for runs DVC's stages make)
SIGTERM_EXIT = 128 + signal.SIGTERM


class Terminated(SystemExit):
    """SIGTERM: the stage stops with exit code 143 and its run is marked KILLED."""


def sigterm_outside(fitting: Callable[[], bool]) -> None:
    """Raise :class:`Terminated` on SIGTERM unless ``fitting()`` (then Lightning handles it)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        if not fitting():
            raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def closing(terminate: Callable[[str], None]) -> Iterator[None]:
    """End the block's run with ``terminate(status)``: FINISHED, KILLED or FAILED."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        yield
    except SIGTERMException:  # Lightning's SystemExit(0): DVC must not take it for success
        terminate("KILLED")
        raise Terminated(SIGTERM_EXIT) from None
    except (KeyboardInterrupt, SystemExit):
        terminate("KILLED")
        raise
    except BaseException:
        terminate("FAILED")
        raise
    terminate("FINISHED")


def model_digest(folder: Path) -> str:
    """sha256 over the relative names and bytes of every file in ``folder``."""
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def find_model_run(client: Any, experiment: str, digest: str, job_dir: str | None = None) -> str | None:
    """The newest run of ``experiment`` tagged with ``digest`` and :data:`JOB_TAG` ``job_dir``: the
    Hydra app's job finds its own training run, and DVC's stages (no job folder) one that no job
    made, even where both trained the same bytes."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"tags.`{DIGEST_TAG}` = '{digest}'" + (f" and tags.`{JOB_TAG}` = '{job_dir}'" if job_dir else "")
    token = None
    while True:  # DVC's run is the newest without a job tag, however many app jobs made the same bytes
        page = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"],
                                  max_results=200, page_token=token)
        found = next((r.info.run_id for r in page if r.data.tags.get(JOB_TAG) == job_dir), None)
        if found is not None or not page.token:
            return found
        token = page.token
