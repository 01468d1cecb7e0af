"""costmodel: predict what one fine-tuning step of a PyTorch model costs, without running it."""

from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.result import StepCost

__all__ = ["StepConfig", "StepCost", "CostModelError", "predict", "predict_ranks", "predict_many", "fits", "maximize"]


def __getattr__(name: str):
    # The engine loads on first use, so that `import costmodel` stays cheap.
    if name == "predict":
        from costmodel.prediction import predict

        return predict
    if name in ("predict_ranks", "predict_many"):
        from costmodel import ranks

        return getattr(ranks, name)
    if name == "fits":
        from costmodel.devices import fits

        return fits
    if name == "maximize":
        from costmodel.plan import maximize

        return maximize
    raise AttributeError(f"module 'costmodel' has no attribute {name!r}")
