"""Evaluation (phase 1B): ground-truth benchmarks, a code-execution sandbox, a pairwise judge
and uncertainty metrics.

* :mod:`cogumi.evaluate.benchmarks` — GSM8K, HumanEval, MBPP, MMLU, ARC-Challenge, HellaSwag,
  BBH: data loading, prompts, answer parsing, scoring.
* :mod:`cogumi.evaluate.sandbox` — run untrusted (model-written) programs in isolated processes.
* :mod:`cogumi.evaluate.metrics` — pass@k, AUROC, expected calibration error.
* :mod:`cogumi.evaluate.run` — the ``eval`` and ``eval-score`` stages and ``compare``.
* :mod:`cogumi.evaluate.judge` — the pairwise LLM-judge stage (local model vs a reference).
"""
