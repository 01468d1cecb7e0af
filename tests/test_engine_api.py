"""The package's public API: every name in ``costmodel.__all__`` is what it says, on every call."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import costmodel


def test_no_submodule_shadows_a_public_name() -> None:
    """Importing a submodule binds it on the package: one named like a public function would
    replace that function after its first use (the class of defect behind `predict` failing on
    its second call)."""
    submodules = {info.name for info in pkgutil.iter_modules(costmodel.__path__)}
    assert not submodules & set(costmodel.__all__)


def test_predict_twice_and_after_predict_ranks_in_one_process() -> None:
    """The README's API snippet, in a fresh process: predict twice, predict_ranks, then predict and
    `from costmodel import predict` again - each a function that answers."""
    script = (
        "import costmodel\n"
        "a = costmodel.predict('resnet18', batch=2, resolution=32)\n"
        "b = costmodel.predict('resnet18', 'lora', rank=2, batch=2, resolution=32)\n"
        "by_rank = costmodel.predict_ranks(costmodel.StepConfig(model='resnet18', method='lora', batch=2, resolution=32), [1, 2])\n"
        "from costmodel import predict, predict_ranks\n"
        "c = predict('resnet18', 'lora', rank=2, batch=2, resolution=32)\n"
        "assert callable(predict) and callable(predict_ranks)\n"
        "assert c.memory == b.memory == by_rank[2].memory and c.flops == by_rank[2].flops\n"
        "assert a.trainable_params > b.trainable_params\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
