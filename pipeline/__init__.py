"""Instruction fine-tuning pipeline: prepare -> render -> train -> evaluate.

Each stage is one module (``pipeline.<stage>``) with a ``run(...)`` computation and a
small ``main()``; library modules (``pipeline.data``, ``pipeline.prompts``, ...) never
import stages.
"""
