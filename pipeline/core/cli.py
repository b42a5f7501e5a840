"""What every stage's command line shares: its paths as options, and the one-line error guard.

A stage declares its inputs and outputs as a frozen dataclass of paths (``Paths``);
:func:`parse` turns each field into an option (``base_model`` -> ``--base-model``), so
``dvc.yaml``'s ``cmd`` is the one place the paths are written. The Hydra app parses the
same ``cmd`` with the same function and rebases the paths into its job and cache
folders (:mod:`pipeline.app`).

Every stage's ``__main__`` block calls :func:`guard`: a
:class:`~pipeline.core.errors.PipelineError` (bad config, data, model, prompt,
template), and the operating-system errors a user can fix (a full disk, an unwritable
or missing path), print ``<stage>: error: <message>`` and exit 1; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from pipeline.core.errors import PipelineError

P = TypeVar("P")

# OSErrors a user fixes by freeing space or choosing another path.
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
               errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST}


def option(name: str) -> str:
    """``base_model`` -> ``--base-model``."""
    return "--" + name.replace("_", "-")


def parser(doc: str | None, paths: type) -> argparse.ArgumentParser:
    """``--params`` plus one option per field of the ``paths`` dataclass (its ``help`` metadata shown)."""
    out = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    out.add_argument("--params", type=Path, default=Path("params.yaml"), help="the composed config")
    for f in dataclasses.fields(paths):  # a field that defaults to None is a path the stage may go without
        out.add_argument(option(f.name), dest=f.name, type=Path, required=f.default is not None, default=None,
                         help=f.metadata.get("help"))
    return out


def parse(doc: str | None, paths: type[P], argv: Sequence[str] | None = None) -> tuple[Path, P]:
    """The params file and the stage's paths from a command line (``argv``, or ``sys.argv``)."""
    args = vars(parser(doc, paths).parse_args(argv))
    params = args.pop("params")
    return params, paths(**args)


def describe(err: BaseException) -> str | None:
    """The one-line message for a known failure, or None for a bug."""
    if isinstance(err, OSError) and err.errno in USER_ERRNOS:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return f"no space left to write {err.filename or 'an output'} ({err.strerror}); free disk space and re-run"
        return f"cannot write or read {err.filename or 'a path'}: {err.strerror}"
    if isinstance(err, _known_errors()):
        return str(err).strip()
    return None


def _known_errors() -> tuple[type[BaseException], ...]:
    known: list[type[BaseException]] = [PipelineError]
    try:  # Hydra's "unknown option in a config group" and friends
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        known += [HydraException, OmegaConfBaseException]
    except ImportError:
        pass
    return tuple(known)


def guard(stage: str, main: Callable[[], int]) -> int:
    """Run ``main``; report a known failure on one line and return 1."""
    try:
        return main()
    except Exception as err:  # noqa: BLE001 - sorted into known and unknown right below
        message = describe(err)
        if message is None:
            raise
        print(f"{stage}: error: {message}", file=sys.stderr)
        return 1


def field(help: str, **kwargs: Any) -> Any:
    """A ``Paths`` field with its ``--help`` text (``default=None`` for an optional path)."""
    return dataclasses.field(metadata={"help": help}, **kwargs)
