"""costmodel: predict what one fine-tuning step of a PyTorch model costs, without running it."""

from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.result import StepCost

__all__ = ["StepConfig", "StepCost", "CostModelError", "predict", "predict_ranks", "predict_many"]


def __getattr__(name: str):
    # The engine loads on first use, so that `import costmodel` stays cheap.
    if name == "predict":
        from costmodel.prediction import predict

        return predict
    if name in ("predict_ranks", "predict_many"):
        from costmodel import ranks

        return getattr(ranks, name)
    raise AttributeError(f"module 'costmodel' has no attribute {name!r}")
