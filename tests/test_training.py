"""fastmeta train / evaluate: every method from the command line, resuming,
stopping by signal, bad configurations, and 2 processes (gloo) against 1."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import fastmeta
from fastmeta.__main__ import main
from fastmeta.training import METHODS

TINY = ["--ways", "3", "--shots", "1", "--queries", "2", "--meta-batch", "2", "--val-episodes", "2",
        "--validate-every", "2", "--log-every", "1", "--no-progress"]


def train(tmp_path, method, *flags, name="run"):
    out = tmp_path / name
    assert main(["train", method, "--out", str(out), *TINY, *flags]) == 0
    return out


def parameters(run):
    return fastmeta.load_checkpoint(run).model.state_dict()


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_and_evaluates_from_the_command_line(tmp_path, method, capsys):
    run = train(tmp_path, method, "--steps", "2")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert [r["step"] for r in records if "val_accuracy" in r] == [2]
    assert (run / "metrics.png").stat().st_size > 0
    assert json.loads((run / "config.json").read_text())["method"] == method
    trained = fastmeta.load_checkpoint(run)
    assert trained.step == 2 and trained.config.method == method
    capsys.readouterr()
    assert main(["evaluate", str(run), "--episodes", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"{method} on chars, test classes, 3-way 1-shot: " in printed and "over 3 episodes" in printed
    result = json.loads((run / "evaluation.jsonl").read_text())
    assert result["episodes"] == 3 and 0 <= result["accuracy"] <= 100


@pytest.mark.parametrize("method", ["protonet", "maml", "reptile"])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, method):
    whole = train(tmp_path, method, "--steps", "4", name="whole")
    part = train(tmp_path, method, "--steps", "2", name="part")
    assert main(["train", "--resume", str(part), "--steps", "4", "--no-progress"]) == 0
    a, b = parameters(whole), parameters(part)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps[:3] == [1, 2, 2] and steps[-1] == 4  # the first run's lines are kept


@pytest.mark.parametrize("number, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_with_a_loadable_checkpoint(tmp_path, number, status):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "fastmeta", "train", "protonet", "--out", str(out),
                                *TINY, "--steps", "100000", "--validate-every", "100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(number)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == status, output
    assert "stopped at step" in output and f"--resume {out}" in output
    trained = fastmeta.load_checkpoint(out)
    assert trained.step >= 1
    assert not list(out.glob("*.tmp"))


def error_of(argv, capsys):
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_configurations_get_one_line_and_status_2(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x")]
    assert "unknown method 'mamll'; choose one of protonet" in error_of(["train", "mamll", *out], capsys)
    assert "500-way episodes need 500 classes, but the val split has" in error_of(
        ["train", "protonet", "--ways", "500", *out], capsys)
    assert "fewer than shots + queries = 25" in error_of(
        ["train", "protonet", "--ways", "5", "--shots", "10", "--queries", "15", *out], capsys)
    missing = tmp_path / "nowhere"
    assert f"Omniglot: no folder {missing}; put the official files" in error_of(
        ["train", "protonet", "--data", f"omniglot:{missing}", *out], capsys)
    assert "unknown data 'imagenet'" in error_of(["train", "protonet", "--data", "imagenet", *out], capsys)
    assert "unknown backbone 'vgg'" in error_of(["train", "maml", "--backbone", "vgg", *out], capsys)
    assert "meta_batch must be >= 1, got 0" in error_of(["train", "maml", "--meta-batch", "0", *out], capsys)
    assert "lam must be > 0, got -1.0" in error_of(["train", "imaml", "--lam", "-1", *out], capsys)
    config = tmp_path / "run.toml"
    config.write_text("ways = 5\nlearning_rate = 0.1\n")
    assert "unknown configuration key(s) ['learning_rate']" in error_of(
        ["train", "protonet", "--config", str(config), *out], capsys)
    config.write_text("ways = [\n")
    assert "is not valid TOML" in error_of(["train", "protonet", "--config", str(config), *out], capsys)
    config.write_text("ways = 'five'\n")
    assert "ways must be a int, got 'five'" in error_of(
        ["train", "protonet", "--config", str(config), *out], capsys)
    assert "give a METHOD, or --resume DIR" in error_of(["train", *out], capsys)


def test_bad_checkpoints_get_one_line_and_status_2(tmp_path, capsys):
    run = train(tmp_path, "protonet", "--steps", "1")
    assert f"{run} already holds a run; resume it with --resume" in error_of(
        ["train", "protonet", "--out", str(run)], capsys)
    assert f"{run} is a protonet run, not maml" in error_of(["train", "maml", "--resume", str(run)], capsys)
    data = (run / "checkpoint.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[:len(data) // 2])
    assert "is not a readable checkpoint (truncated or corrupted?)" in error_of(
        ["evaluate", str(truncated)], capsys)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert "is not a fastmeta training checkpoint" in error_of(["evaluate", str(foreign)], capsys)
    (tmp_path / "empty").mkdir()
    assert f"no checkpoint at {tmp_path / 'empty' / 'checkpoint.pt'}" in error_of(
        ["evaluate", str(tmp_path / "empty")], capsys)
    assert "maml was trained with a 3-way classifier; it evaluates 3-way episodes only" in error_of(
        ["evaluate", str(train(tmp_path, "maml", "--steps", "1", name="maml")), "--ways", "5"], capsys)
    assert (run / "checkpoint.pt").read_bytes() == data  # nothing already written is lost


def test_a_toml_file_sets_values_and_flags_override_it(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("ways = 4\nshots = 2\nmeta-batch = 3\nlr = 0.01\n")
    made = fastmeta.training.make_config("maml", str(config), shots=1)
    assert (made.ways, made.shots, made.meta_batch, made.lr, made.inner_lr) == (4, 1, 3, 0.01, 0.4)


@pytest.mark.parametrize("method", ["protonet", "maml"])
def test_two_processes_equal_one_with_the_same_meta_batch(tmp_path, method):
    flags = ["train", method, *TINY, "--steps", "3", "--validate-every", "100"]
    one = tmp_path / "one"
    assert main([*flags, "--out", str(one)]) == 0
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "-m", "fastmeta", *flags, "--out", str(two)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [[r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "loss" in r] for run in (one, two)]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-6)
    # Parameters whose gradient is zero in exact arithmetic (a convolution's
    # bias before batch norm; for ProtoNet the last batch norm's shift, since
    # distances ignore a common shift) get rounding noise that Adam
    # normalises into full steps, so they are not compared; batch-norm running
    # statistics are averaged over the processes, not accumulated in sequence.
    no_gradient = re.compile(r"\.\d\.0\.bias$|running|num_batches" + ("|backbone\\.3\\.1\\.bias"
                                                                     if method == "protonet" else ""))
    a, b = parameters(one), parameters(two)
    compared = [key for key in a if not no_gradient.search(key)]
    assert len(compared) >= 9
    for key in compared:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
