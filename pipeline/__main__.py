"""``python -m pipeline [overrides]``: the Hydra app of :mod:`pipeline.app` (``-m`` for a multirun)."""

from pipeline.app import main

if __name__ == "__main__":
    main()
