"""Instruction fine-tuning pipeline: prepare -> render -> train -> evaluate.

Each stage is one module (``pipeline.<stage>``) with a ``run(...)`` computation and a
small ``main()``; library modules (``pipeline.data``, ``pipeline.prompting.templates``, ...) never
import stages.
"""
