"""The examples run end to end (a few meta-iterations each)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script, args, expect", [
    ("l2o_quadratic.py", ["--meta-iterations", "2", "--batch", "8"], "Mean loss after 100 steps"),
    ("meta_learner_fewshot.py", ["--meta-iterations", "50", "--meta-batch", "1"], "meta-iteration    50"),
    ("maml_sinusoid.py", ["--iterations", "20", "--eval-tasks", "20", "--out", "{tmp}"], "| Meta-SGD |"),
])
def test_example_runs(script, args, expect, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES.parent), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout
