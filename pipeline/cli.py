"""Entry-point guard: known failures become one clear line, not a library traceback.

Every stage's ``__main__`` block calls :func:`guard`. Errors the pipeline raises on bad
input (config, data, model, prompt, template) and the operating-system errors a user can
fix (a full disk, an unwritable or missing path) print ``<stage>: error: <message>`` and
exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from typing import Callable

# OSErrors a user fixes by freeing space or choosing another path.
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
               errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST}


def _known_errors() -> tuple[type[BaseException], ...]:
    from pipeline.core.errors import PipelineError

    known: list[type[BaseException]] = [PipelineError]
    try:  # Hydra's "unknown option in a config group" and friends
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        known += [HydraException, OmegaConfBaseException]
    except ImportError:
        pass
    return tuple(known)


def describe(err: BaseException) -> str | None:
    """The one-line message for a known failure, or None for a bug."""
    if isinstance(err, OSError) and err.errno in USER_ERRNOS:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return f"no space left to write {err.filename or 'an output'} ({err.strerror}); free disk space and re-run"
        return f"cannot write or read {err.filename or 'a path'}: {err.strerror}"
    if isinstance(err, _known_errors()):
        return str(err).strip()
    return None


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
