"""``costmodel finetune``: a real fine-tuning loop whose every measured step equals its prediction."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from costmodel.cli import main
from costmodel.errors import CostModelError
from costmodel.models import build_model
from costmodel.validation.finetune import (
    FinetuneConfig, FinetuneResult, checkpoint_metadata, checkpoint_path, compared_fields, load_checkpoint, pretrain,
    run_finetune,
)

# Tiny on purpose: mobilenet_v3_small at 16 x 16 ends at 1 x 1, so every training batch needs at
# least 2 images (batch norm); 19 training images in batches of 8 make epochs of 8, 8 and a partial
# 3, evaluated at the end of the epoch; GaLore runs a fourth step into the second epoch, where its
# T = 3 refreshes (steps 1 and 4: not on the partial step 3, which keeps its own kind); 1 % of each
# class (20 images: two batches of 8 and a partial one) is evaluated.
BASE = FinetuneConfig(model="mobilenet_v3_small", task="digits-impulse_noise-3", batch=8, resolution=16,
                      train_size=19, steps=3, eval_fraction=0.01, pretrain_epochs=1, pretrain_size=32,
                      progress=False)
METHOD_OPTIONS = {"fft": {}, "bn_head": {}, "lora": {}, "dora": {}, "galore": {"update_proj_gap": 3}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One checkpoint directory for the module (pretrained once, shared by every test), and one
    intra-op thread: on a busy 2-core machine two threads make an SVD ten times slower."""
    directory = tmp_path_factory.mktemp("costmodel-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COSTMODEL_CACHE", str(directory))
        pretrain(BASE, "digits")
        yield directory
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_every_measured_step_equals_its_prediction(method: str, cache: Path) -> None:
    galore = method == "galore"
    result = run_finetune(BASE.replace(method=method, options=METHOD_OPTIONS[method], steps=4 if galore else 3,
                                       eval_every=4 if galore else None))
    assert isinstance(result, FinetuneResult) and result.config["checkpoint_reused"]
    kinds = [record.planned.kind for record in result.steps]
    assert kinds == (["first", "steady", "partial", "refresh", "evaluate"] if galore
                     else ["first", "steady", "partial", "evaluate"])
    assert [record.planned.batch for record in result.steps if record.planned.phase == "train"] == \
        [8, 8, 3, 8][:len(kinds) - 1]
    for record in result.steps:  # a run this short measures everything
        assert record.measured is not None and record.seconds > 0
        fields = list(compared_fields(record.predicted, record.measured))
        assert len(fields) == (8 if record.planned.phase == "train" else 4) + 9
        differing = [(name, predicted, measured) for name, predicted, measured in fields if predicted != measured]
        assert differing == [], f"{method} step {record.planned.step} ({record.planned.kind}): {differing}"
    assert result.all_equal and result.mismatches() == []
    [point] = result.accuracy
    assert (point.step, point.epoch) == ((4, 2) if galore else (3, 1)) and 0 <= point.eval_accuracy <= 1 and point.eval_loss > 0
    assert "every measured step equals its prediction: yes" in result.render()
    document = json.loads(result.to_json())
    evaluation = document["steps"][-1]
    assert evaluation["phase"] == "evaluate" and sum(evaluation["eval_batches"]) == document["config"]["eval_images"]
    assert evaluation["eval_batches"][-1] < 8  # the last eval batch is partial too
    assert set(document["steps"][0]) >= {"step", "phase", "batch", "kind", "predicted", "measured", "seconds", "tracked"}


def test_unseen_classes_get_a_new_head(cache: Path) -> None:
    """digits-unseen pretrains on digits-0to4 inside the run (not cached yet): the run then starts
    from the checkpoint exactly as a reused one would, and still equals its predictions."""
    result = run_finetune(BASE.replace(task="digits-unseen", method="bn_head", steps=2))
    assert not result.config["checkpoint_reused"] and result.config["source"] == "digits-0to4"
    assert result.config["new_head"] == "classifier" and result.config["classes"] == 5
    assert result.all_equal, result.mismatches()
    assert [record.planned.kind for record in result.steps] == ["first", "steady", "evaluate"]
    untracked = run_finetune(BASE.replace(task="digits-unseen", method="bn_head", steps=2, measure=False))
    assert untracked.config["checkpoint_reused"] and all(record.measured is None for record in untracked.steps)
    assert untracked.accuracy == result.accuracy  # tracking changes no number of the run


def test_checkpoint_mismatch_is_one_line(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSTMODEL_CACHE", str(cache))
    path = checkpoint_path(BASE, "digits")
    assert path.exists()
    other = build_model("resnet18", num_classes=10)
    with pytest.raises(CostModelError, match="does not fit model .*missing"):
        load_checkpoint(path, other, checkpoint_metadata(BASE, "digits", 10))
    with pytest.raises(CostModelError, match=r"does not match this run: seed 0 \(expected 7\)"):
        load_checkpoint(path, build_model(BASE.model), checkpoint_metadata(BASE.replace(seed=7), "digits", 10))
    # A file in the place of another run's checkpoint, and a corrupt one, refuse the run itself.
    shutil.copy(path, checkpoint_path(BASE.replace(seed=3), "digits"))
    with pytest.raises(CostModelError, match="does not match this run"):
        run_finetune(BASE.replace(seed=3, method="bn_head", measure=False))
    corrupt = checkpoint_path(BASE.replace(seed=4), "digits")
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CostModelError, match="cannot be read") as refused:
        run_finetune(BASE.replace(seed=4, method="bn_head", measure=False))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("arguments, message", [
    (["--task", "digits-fog-3"], "unknown corruption 'fog'"),
    (["--task", "digits-impulse_noise-9"], "is not an integer 1..5"),
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--epochs", "1", "--steps", "2"], "not both"),
    (["--eval-every", "0"], "--eval-every must be"),
    (["--measure-every", "0"], "--measure-every must be"),
    (["--batch", "0"], "--batch must be"),
    (["--train-size", "100000"], "exceeds the"),
    (["--json", "/no/such/dir/out.json"], "--json: cannot write"),
    (["--method", "fft", "--rank", "8"], "takes no rank"),
    (["--model", "no_such_net"], "unknown model"),
])
def test_bad_input_is_one_line_and_exit_2(arguments: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSTMODEL_CACHE", str(tmp_path))
    code = main(["finetune", "--task", "digits", "--resolution", "16", *arguments])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("costmodel: error:") and message in lines[0], captured.err
    assert not any(tmp_path.iterdir())  # refused before any work: nothing pretrained


def test_cli_runs_and_writes_json(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSTMODEL_CACHE", str(cache))
    out = tmp_path / "run.json"
    code = main(["finetune", "--model", BASE.model, "--method", "bn_head", "--task", BASE.task, "--batch", "8",
                 "--resolution", "16", "--train-size", "19", "--steps", "2", "--eval-fraction", "0.01",
                 "--pretrain-epochs", "1", "--pretrain-size", "32", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "every measured step equals its prediction: yes" in captured.out
    document = json.loads(out.read_text())
    assert document["config"]["method"] == "bn_head" and document["config"]["lr"] == 1e-2
    assert [step["kind"] for step in document["steps"]] == ["first", "steady", "evaluate"]
    assert document["accuracy"][0]["step"] == 2


def test_a_run_in_bf16_with_checkpointing_equals_its_predictions(cache: Path) -> None:
    """The setup options on a real run: the pretrained model cast to bf16, every block of the
    features checkpointed in the training steps; every step still equals its prediction."""
    result = run_finetune(BASE.replace(method="lora", steps=3, dtype="bf16", checkpoint="features.*"))
    assert result.all_equal and all(record.measured is not None for record in result.steps)
    assert "dtype=bf16, checkpoint=features.*" in result.render().splitlines()[0]
    with pytest.raises(CostModelError, match="--dtype must be one of"):
        run_finetune(BASE.replace(dtype="fp64"))


def test_a_run_with_accumulation_and_another_optimizer_equals_its_predictions(cache: Path) -> None:
    """Two micro-batches of ``batch`` images per optimizer step, trained by Adafactor's foreach
    path: every step equals its prediction; an epoch has only whole groups of 2 x batch images."""
    config = BASE.replace(method="lora", steps=3, accumulate=2, optimizer="adafactor",
                          optimizer_options={"foreach": True})
    result = run_finetune(config)
    assert result.all_equal and all(record.measured is not None for record in result.steps)
    header = result.render().splitlines()[0]
    assert "optimizer=adafactor, optimizer_options={'foreach': True}, accumulate=2" in header
    assert result.config["steps_per_epoch"] == result.config["train_images"] // (2 * BASE.batch)
    with pytest.raises(CostModelError, match="--optimizer-option momentum"):
        run_finetune(BASE.replace(optimizer="adafactor", optimizer_options={"momentum": 0.9}))
    with pytest.raises(CostModelError, match="--accumulate"):
        run_finetune(BASE.replace(accumulate=0))
