"""cogumi: train, evaluate, distill and compress LLMs — the Cogumi method as a library.

Importing ``cogumi`` is cheap: stages import torch and friends only when they run.
"""

__version__ = "0.1.0"

from cogumi.stage import StageConfig, StageResult, run_stage

__all__ = ["StageConfig", "StageResult", "__version__", "run_stage"]
