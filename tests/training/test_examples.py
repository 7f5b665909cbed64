"""The examples run end to end (a few meta-iterations each)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmeta.data import data_dir

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OMNIGLOT = data_dir() / "omniglot"


@pytest.mark.parametrize(
    "script, args, expect",
    [
        ("l2o_quadratic.py", ["--meta-iterations", "2", "--batch", "8"], "Mean loss after 100 steps"),
        ("meta_learner_fewshot.py", ["--meta-iterations", "50", "--meta-batch", "1"], "meta-iteration    50"),
        (
            "metric_fewshot.py",
            ["--method", "relation", "--steps", "3", "--test-episodes", "20"],
            "| relation | chars | 5-way 5-shot |",
        ),
        pytest.param(
            "metric_fewshot.py",
            ["--method", "protonet", "--data", "omniglot", "--steps", "3", "--ways", "5", "--test-episodes", "20"],
            "| protonet | omniglot | 5-way 1-shot |",
            marks=pytest.mark.skipif(
                not (OMNIGLOT / "images_background_small1.zip").exists(),
                reason=f"the Omniglot subsets are not at {OMNIGLOT} (set FASTMETA_DATA)",
            ),
        ),
        ("mann_fewshot.py", ["--steps", "3", "--test-episodes", "20"], "| fastmeta MANN, chars (3 steps) |"),
        ("maml_sinusoid.py", ["--iterations", "20", "--eval-tasks", "20", "--out", "{tmp}"], "| Meta-SGD |"),
    ],
)
def test_example_runs(script, args, expect, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES.parent), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout


def test_inference_time_methods_example_on_a_trained_backbone(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES.parent), env.get("PYTHONPATH")]))
    run = tmp_path / "protonet"
    train = [sys.executable, "-m", "fastmeta", "train", "protonet", "--steps", "3", "--out", str(run)]
    assert subprocess.run(train, capture_output=True, text=True, timeout=600, env=env).returncode == 0
    script = [sys.executable, str(EXAMPLES / "inference_time_methods.py"), str(run), "--episodes", "20", "--shots", "1"]
    script += ["--feat-steps", "3"]
    result = subprocess.run(
        [*script, "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr
    for name in ("SimpleShot (CL2N)", "TIM", "PT-MAP", "LaplacianShot", "FEAT"):
        assert f"5-way 1-shot  {name}" in result.stdout
    assert len(json.loads((tmp_path / "r.json").read_text())["results"]) == 9
