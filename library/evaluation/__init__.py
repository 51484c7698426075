"""Model evaluation: CLIP score, LAION aesthetic score, per-model statistics, plots, HTML report, generation.

``tools/evaluate.py`` is the command line; the training loop reuses :class:`scoring.Scorer` for its
scored samples. Modules import torch/transformers lazily or at their own top, never here.
"""
