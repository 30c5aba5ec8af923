"""The recipe interface of models/ (models/recipe.py): the registry, building as a no-op when
the model is there, `python -m models`, and the command lines an AccuracyTask makes, scored
against an independent count of right answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from click.testing import CliRunner

from models import recipe as recipes
from models.listops import evaluate as listops_evaluate
from models.listops import task as listops_task

REPO = Path(__file__).resolve().parents[1]


def test_every_recipe_folder_is_registered_under_its_cli_name():
    found = recipes.recipes()
    assert set(found) == {"line-retrieval", "listops", "minilm", "smollm2"}
    for name, recipe in found.items():
        assert recipe.folder == REPO / "models" / name.replace("-", "_")
    assert found["listops"].model_path() == REPO / "models" / "listops" / "listops.onnx"
    assert {name for name, recipe in found.items() if recipe.has_eval_task()} == {"line-retrieval", "listops"}


def test_building_a_shipped_model_is_a_no_op():
    recipe = recipes.get("listops")
    before = recipe.model_path().stat().st_mtime_ns
    said = []
    assert recipe.build(log=said.append) == recipe.model_path()
    assert said == [] and recipe.model_path().stat().st_mtime_ns == before


def test_the_models_command_lists_and_refuses_an_unknown_recipe():
    run = lambda *args: subprocess.run([sys.executable, "-m", "models", *args], cwd=REPO,  # noqa: E731
                                       capture_output=True, text=True)
    listed = run()
    assert listed.returncode == 0
    states = dict(line.split()[:2] for line in listed.stdout.splitlines()[::2])
    assert states == {name: "built" if recipe.is_built() else "not" for name, recipe in recipes.recipes().items()}
    assert states["line-retrieval"] == states["listops"] == "built"  # shipped in the repository
    unknown = run("build", "no-such-model")
    assert unknown.returncode == 2 and "no recipe 'no-such-model'" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_standalone_evaluate_counts_what_the_model_answers(tmp_path):
    report = tmp_path / "metrics.json"
    result = CliRunner().invoke(listops_evaluate.TASK.standalone(),
                                ["--samples", "5", "--batch-size", "2", "--output", str(report)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(report.read_text())
    # The same expressions, one at a time, scored here.
    session = ort.InferenceSession(str(listops_evaluate.ONNX_FILE), providers=["CPUExecutionProvider"])
    vocab = listops_task.Vocab.load()
    predictions, labels = [], []
    for start, count in ((0, 2), (2, 2), (4, 1)):
        ids, mask, batch_labels = listops_task.make_batch(vocab, (listops_evaluate.TEST_SEED, start), count)
        for row in range(count):
            kept = mask[row] == 1
            (logits,) = session.run(["logits"], {"input_ids": ids[row][kept][None],
                                                 "attention_mask": mask[row][kept][None]})
            predictions.append(int(logits.argmax()))
        labels += batch_labels.tolist()
    assert metrics["predictions"] == predictions
    assert metrics["accuracy"] == np.mean(np.equal(predictions, labels))
    assert metrics["samples"] == 5 and metrics["test_seed"] == listops_evaluate.TEST_SEED
    assert f"accuracy {metrics['accuracy']:.3f} over 5 expressions" in result.output


def test_eval_and_standalone_commands_share_the_task_options():
    from models.line_retrieval import evaluate

    for command in (evaluate.command, evaluate.TASK.standalone()):
        names = {option for param in command.params for option in param.opts}
        assert {"--lengths", "--samples", "--batch-size", "--threads"} <= names
        bad = CliRunner().invoke(command, ["--lengths", "4k"])
        assert bad.exit_code == 2 and "comma-separated integers" in bad.output
