"""fastmeta train / evaluate: every method from the command line, resuming,
stopping by signal, bad configurations, and 2 processes (gloo) against 1."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastmeta
from fastmeta.__main__ import main
from fastmeta.training import METHODS

TINY = [
    "--ways",
    "3",
    "--shots",
    "1",
    "--queries",
    "2",
    "--meta-batch",
    "2",
    "--val-episodes",
    "2",
    "--validate-every",
    "2",
    "--log-every",
    "1",
    "--no-progress",
]


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
    assert f"{method} on chars (random split), test classes, 3-way 1-shot: " in printed and "over 3 episodes" in printed
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
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastmeta",
            "train",
            "protonet",
            "--out",
            str(out),
            *TINY,
            "--steps",
            "100000",
            "--validate-every",
            "100000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
        ["train", "protonet", "--ways", "500", *out], capsys
    )
    assert "fewer than shots + queries = 25" in error_of(
        ["train", "protonet", "--ways", "5", "--shots", "10", "--queries", "15", *out], capsys
    )
    missing = tmp_path / "nowhere"
    assert f"Omniglot: no folder {missing}; put the official files" in error_of(
        ["train", "protonet", "--data", f"omniglot:{missing}", *out], capsys
    )
    assert "unknown data 'imagenet'" in error_of(["train", "protonet", "--data", "imagenet", *out], capsys)
    assert "unknown data 'folder:'" in error_of(["train", "protonet", "--data", "folder:", *out], capsys)
    assert "unknown backbone 'vgg'" in error_of(["train", "maml", "--backbone", "vgg", *out], capsys)
    assert "meta_batch must be >= 1, got 0" in error_of(["train", "maml", "--meta-batch", "0", *out], capsys)
    assert "lam must be > 0, got -1.0" in error_of(["train", "imaml", "--lam", "-1", *out], capsys)
    config = tmp_path / "run.toml"
    config.write_text("ways = 5\nlearning_rate = 0.1\n")
    assert "unknown configuration key(s) ['learning_rate']" in error_of(
        ["train", "protonet", "--config", str(config), *out], capsys
    )
    config.write_text("ways = [\n")
    assert "is not valid TOML" in error_of(["train", "protonet", "--config", str(config), *out], capsys)
    config.write_text("ways = 'five'\n")
    assert "ways must be a int, got 'five'" in error_of(["train", "protonet", "--config", str(config), *out], capsys)
    assert "give a METHOD, or --resume DIR" in error_of(["train", *out], capsys)


def test_named_data_is_read_from_fastmeta_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTMETA_DATA", str(tmp_path / "data"))
    assert f"Omniglot: no folder {tmp_path / 'data' / 'omniglot'}; put the official files" in error_of(
        ["train", "protonet", "--data", "omniglot", "--out", str(tmp_path / "x")], capsys
    )
    monkeypatch.delenv("FASTMETA_DATA")
    assert fastmeta.data.data_dir() == Path.home() / ".cache" / "fastmeta" / "data"


def test_bad_checkpoints_get_one_line_and_status_2(tmp_path, capsys):
    run = train(tmp_path, "protonet", "--steps", "1")
    assert f"{run} already holds a run; resume it with --resume" in error_of(
        ["train", "protonet", "--out", str(run)], capsys
    )
    assert f"{run} is a protonet run, not maml" in error_of(["train", "maml", "--resume", str(run)], capsys)
    data = (run / "checkpoint.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    assert "is not a readable checkpoint (truncated or corrupted?)" in error_of(["evaluate", str(truncated)], capsys)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert "is not a fastmeta training checkpoint" in error_of(["evaluate", str(foreign)], capsys)
    (tmp_path / "empty").mkdir()
    assert f"no checkpoint at {tmp_path / 'empty' / 'checkpoint.pt'}" in error_of(
        ["evaluate", str(tmp_path / "empty")], capsys
    )
    assert "maml was trained with a 3-way classifier; it evaluates 3-way episodes only" in error_of(
        ["evaluate", str(train(tmp_path, "maml", "--steps", "1", name="maml")), "--ways", "5"], capsys
    )
    assert (run / "checkpoint.pt").read_bytes() == data  # nothing already written is lost


def image_folder(root, classes, per_class, size=16):
    """A class-per-folder dataset of random greyscale PNGs."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / f"c{c:02d}" / f"{i}.png")
    return root


def test_validation_uses_the_runs_queries(tmp_path):
    """4 images per class: 1 shot + 2 queries fit, the 15 validation queries
    once used whatever --queries said did not."""
    data = image_folder(tmp_path / "data", classes=30, per_class=4)
    run = train(tmp_path, "protonet", "--data", f"folder:{data}", "--image-size", "16", "--steps", "2")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_accuracy" in r] == [2]


def test_undrawable_validation_episodes_are_refused_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    image_folder(data / "train", classes=4, per_class=5)
    image_folder(data / "val", classes=4, per_class=2)
    image_folder(data / "test", classes=4, per_class=5)
    out = tmp_path / "run"
    assert "fewer than shots + queries = 3" in error_of(
        ["train", "protonet", "--data", f"folder:{data}", "--image-size", "16", "--out", str(out), *TINY], capsys
    )
    assert not out.exists()


def test_a_cut_metrics_line_is_dropped_on_resume(tmp_path):
    run = train(tmp_path, "protonet", "--steps", "2")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # what a killed writer leaves
    assert main(["train", "--resume", str(run), "--steps", "4", "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_a_checkpoint_that_cannot_be_written_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    def disk_full(content, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "run"
    message = error_of(["train", "protonet", "--out", str(out), *TINY, "--steps", "1"], capsys)
    assert f"could not write the checkpoint {out / 'checkpoint.pt'} (disk full?): " in message
    assert not list(out.glob("*.tmp")) and not (out / "checkpoint.pt").exists()


def test_a_failed_validation_still_writes_the_checkpoint(tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise MemoryError("validation ran out of memory")

    monkeypatch.setattr(fastmeta.training.run, "episode_accuracies", failing)
    with pytest.raises(MemoryError):
        main(["train", "protonet", "--out", str(tmp_path / "run"), *TINY, "--steps", "3", "--checkpoint-every", "100"])
    assert fastmeta.load_checkpoint(tmp_path / "run").step == 2


def test_a_new_run_never_appends_to_another_runs_logs(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert "holds the logs of a run that stopped before its first checkpoint" in error_of(
        ["train", "protonet", "--out", str(out), *TINY], capsys
    )
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


def test_bad_values_and_flag_combinations_get_one_line_and_status_2(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x")]
    for flags, message in [
        (["--lr", "inf"], "lr must be a finite number, got inf"),
        (["--lr", "nan"], "lr must be a finite number, got nan"),
        (["--lr", "-1"], "lr must be > 0, got -1.0"),
        (["--inner-lr", "-0.1"], "inner_lr must be >= 0, got -0.1"),
        (["--lam", "inf"], "lam must be a finite number, got inf"),
        (["--seed", "-1"], "seed must be in 0 .. 2**32 - 1, got -1"),
        (["--seed", str(2**33)], f"seed must be in 0 .. 2**32 - 1, got {2**33}"),
        (["--device", "foo"], "unknown device 'foo'; use cpu, cuda or cuda:N"),
        (["--device", "meta"], "device 'meta' is not supported; use cpu, cuda or cuda:N"),
        (["--image-size", "2"], "maml with the conv4 backbone cannot take (1, 2, 2) images (image_size 2)"),
    ]:
        assert message in error_of(["train", "maml", *out, *flags], capsys), flags
    if not torch.cuda.is_available():
        assert "device 'cuda': no GPU is available to this PyTorch" in error_of(
            ["train", "maml", *out, "--device", "cuda"], capsys
        )
    assert "is a folder" in error_of(["train", "maml", *out, "--config", str(tmp_path)], capsys)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)))
    assert f"the configuration file {binary} is not valid TOML" in error_of(
        ["train", "maml", *out, "--config", str(binary)], capsys
    )
    reptile = tmp_path / "reptile.toml"
    reptile.write_text('method = "reptile"\n')
    assert f"the configuration file {reptile} sets method = 'reptile', but the command names 'maml'" in error_of(
        ["train", "maml", *out, "--config", str(reptile)], capsys
    )
    (tmp_path / "file").write_text("")
    assert f"--out {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, not a folder" in error_of(
        ["train", "maml", "--out", str(tmp_path / "file" / "run")], capsys
    )


def test_flags_given_with_resume_are_applied_or_refused(tmp_path, capsys):
    run = train(tmp_path, "protonet", "--steps", "1")
    config = tmp_path / "more.toml"
    config.write_text("steps = 5\n")
    assert "--config cannot be used with --resume" in error_of(
        ["train", "--resume", str(run), "--config", str(config)], capsys
    )
    assert "--out cannot be used with --resume: the run continues in" in error_of(
        ["train", "--resume", str(run), "--out", str(tmp_path / "other")], capsys
    )
    message = error_of(["train", "--resume", str(run), "--backbone", "resnet12"], capsys)
    assert f"the model saved in {run} does not fit this configuration" in message
    assert main(["train", "--resume", str(run / "checkpoint.pt"), "--steps", "2", "--no-progress"]) == 0
    assert fastmeta.load_checkpoint(run).step == 2
    content = torch.load(run / "checkpoint.pt", weights_only=False)
    del content["optimizer"]
    torch.save(content, run / "checkpoint.pt")
    assert "is a damaged fastmeta checkpoint: it lacks ['optimizer']" in error_of(
        ["train", "--resume", str(run), "--steps", "3"], capsys
    )


def test_files_that_cannot_be_written_get_one_line_or_a_warning(tmp_path, capsys, monkeypatch):
    assert "/proc/fastmeta-run: No such file or directory" in error_of(
        ["train", "protonet", "--out", "/proc/fastmeta-run/run", *TINY, "--steps", "1"], capsys
    )

    def broken_plot(self):
        raise RuntimeError("no space left for the figure")

    monkeypatch.setattr(fastmeta.training.run.Log, "_plot", broken_plot)
    capsys.readouterr()
    run = train(tmp_path, "protonet", "--steps", "2")
    assert fastmeta.load_checkpoint(run).step == 2
    warning = f"fastmeta train: warning: could not draw {run / 'metrics.png'}: no space left for the figure"
    assert warning in capsys.readouterr().err.splitlines()


def test_bad_evaluation_values_get_one_line_and_status_2(tmp_path, capsys):
    run = train(tmp_path, "protonet", "--steps", "1")
    for flags, message in [
        (["--episodes", "0"], "episodes must be >= 1, got 0"),
        (["--episodes", "-5"], "episodes must be >= 1, got -5"),
        (["--queries", "0"], "queries must be >= 1, got 0"),
        (["--ways", "0"], "ways must be >= 1, got 0"),
        (["--shots", "0"], "shots must be >= 1, got 0"),
        (["--device", "foo"], "unknown device 'foo'"),
    ]:
        assert message in error_of(["evaluate", str(run), *flags], capsys), flags
    assert not (run / "evaluation.jsonl").exists()


def test_a_toml_file_sets_values_and_flags_override_it(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("ways = 4\nshots = 2\nmeta-batch = 3\nlr = 0.01\n")
    made = fastmeta.training.make_config("maml", str(config), shots=1)
    assert (made.ways, made.shots, made.meta_batch, made.lr, made.inner_lr) == (4, 1, 3, 0.01, 0.4)


def test_numpy_scalars_are_python_numbers_in_a_configuration():
    made = fastmeta.training.make_config("maml", ways=np.int64(4), lr=np.float32(0.5), steps=np.int32(3))
    assert (made.ways, made.lr, made.steps) == (4, 0.5, 3)
    assert (type(made.ways), type(made.lr), type(made.steps)) == (int, float, int)
    with pytest.raises(fastmeta.training.ConfigError, match="ways must be a int, got 2.5"):
        fastmeta.training.make_config("maml", ways=2.5)


FIRST_STEP = textwrap.dedent("""
    import sys
    import torch
    from fastmeta.training import make_config
    from fastmeta.training.run import (Episodes, build_method, load_data, meta_batch_gradients,
                                       start_processes)
    method, out = sys.argv[1], sys.argv[2]
    torch.set_default_dtype(torch.float64)  # equal up to float64 rounding, nothing amplified
    config = make_config(method, ways=3, shots=1, queries=2, meta_batch=4)
    processes = start_processes(config)
    torch.manual_seed(config.seed)
    data = load_data(config, "train")
    episodes = Episodes(data, config.ways, config.shots, config.queries, config.seed)
    trained = build_method(config, data.images.shape[1:])
    local = config.meta_batch // processes.world
    e = episodes.tasks(0, processes.rank * local, local)
    e = type(e)(*(t.double() if t.is_floating_point() else t for t in e))
    loss, _ = meta_batch_gradients(trained, e, processes, local)
    if processes.main:
        torch.save({"loss": loss, "buffers": dict(trained.model.named_buffers()),
                    "grads": {n: p.grad for n, p in trained.model.named_parameters()}}, out)
""")


@pytest.mark.parametrize("method", ["protonet", "relation", "maml"])
def test_two_processes_give_one_process_meta_gradient_and_batch_norm_statistics(tmp_path, method):
    """The first step's all-reduced meta-gradient and the batch norms'
    running statistics (updated task by task, support then query calls,
    and by the relation module's own update) equal one process's, in float64."""
    script = tmp_path / "first_step.py"
    script.write_text(FIRST_STEP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launcher, name in (
        ([], "one.pt"),
        (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "two.pt"),
    ):
        result = subprocess.run(
            [sys.executable, *launcher, str(script), method, str(tmp_path / name)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = (torch.load(tmp_path / name) for name in ("one.pt", "two.pt"))
    torch.testing.assert_close(two["loss"].double(), one["loss"], rtol=1e-6, atol=0)  # logged in float32
    assert one["grads"].keys() == two["grads"].keys()
    for key, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][key], grad, rtol=1e-9, atol=1e-12, msg=key)
    running = [key for key in one["buffers"] if "running" in key or "num_batches" in key]
    assert len(running) >= (0 if method == "maml" else 12)
    for key in running:
        torch.testing.assert_close(two["buffers"][key], one["buffers"][key], rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("method", ["protonet", "maml"])
def test_two_processes_train_with_the_losses_of_one(tmp_path, method):
    flags = ["train", method, *TINY, "--steps", "3", "--validate-every", "100"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    # One thread per process in both runs: the channels-last convolutions'
    # backward rounds differently with 1 and 2 threads, and three Adam steps
    # grow that into more than the tolerance below (float64 gradients are
    # compared exactly in the test above).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "fastmeta", *flags, "--out", str(one)], capture_output=True, text=True, env=env
    )
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "fastmeta",
            *flags,
            "--out",
            str(two),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [
        [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        for run in (one, two)
    ]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-6)
