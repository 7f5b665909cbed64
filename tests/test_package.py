"""The package around the kernels: the extension loader, `fastmeta info` and `fastmeta bench`."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import fastmeta
from fastmeta import _build_config, _extension
from fastmeta.__main__ import main


def test_extension_built_for_another_pytorch_fails_with_both_versions(monkeypatch):
    monkeypatch.setattr(_build_config, "TORCH_VERSION", "1.0.0")
    with pytest.raises(ImportError) as error:
        _extension.load()
    message = str(error.value)
    assert "built against PyTorch 1.0.0" in message
    assert f"PyTorch {torch.__version__} is installed" in message
    assert "pip install --no-build-isolation" in message


def test_build_info_matches_the_installed_pytorch():
    info = fastmeta._C.build_info()
    assert torch.__version__.startswith(info["torch_version"])
    assert info["with_cuda"] == _build_config.WITH_CUDA


def test_info_command(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"fastmeta {fastmeta.__version__}" in out
    assert f"PyTorch {torch.__version__}" in out
    assert "CUDA kernels compiled in:" in out


def test_module_entry_point_runs_info():
    result = subprocess.run([sys.executable, "-m", "fastmeta", "info"], capture_output=True, text=True)
    assert result.returncode == 0 and "CUDA kernels compiled in:" in result.stdout


def test_info_names_the_cpu_instruction_set_and_its_cap():
    capped = subprocess.run(
        [sys.executable, "-m", "fastmeta", "info"],
        capture_output=True,
        text=True,
        env={**os.environ, "FASTMETA_CPU_ISA": "baseline"},
    )
    assert capped.returncode == 0
    line = next(l for l in capped.stdout.splitlines() if "vector instructions, by family" in l)
    for family in ("similarity", "lstm", "mlp", "model-based", "prototypes"):
        assert f"{family} baseline" in line or f"{family} portable" in line, line
    assert "blas PyTorch's" in line


def test_bench_command_prints_a_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--case", "proto_episode", "--no-compile", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "proto_episode" in out and "speedup" in out
    isa = fastmeta._C.cpu_isa()
    assert f"CPU kernels: similarity {isa}, lstm {isa}, mlp {isa}" in out
    written = json.loads(path.read_text())
    assert written["machine"]["cpu_isa"] == isa
    assert written["machine"]["cpu_kernels"]["lstm"] == isa
    assert written["machine"]["cpu_kernels"]["prototypes"] == "baseline"
    results = written["results"]
    assert {r["baseline"] for r in results} == {"eager (cdist)", "eager (matmul)"}
    for r in results:
        assert r["fastmeta_ms"] > 0 and r["baseline_ms"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["fastmeta_ms"])


def test_bench_adds_a_compiled_baseline_with_its_compile_time(tmp_path, capsys):
    target = tmp_path / "bench.json"
    assert main(["bench", "--case", "matching_readout", "--no-memory", "--json", str(target)]) == 0
    rows = json.loads(target.read_text())["results"]
    assert [r["baseline"] for r in rows] == ["eager", "torch.compile (eager)"]
    compiled = rows[1]
    assert compiled["compile_s"] > 0 and compiled["baseline_ms"] > 0
    assert compiled["speedup"] == compiled["baseline_ms"] / compiled["fastmeta_ms"]
    assert "compile_s" not in rows[0]
    printed = capsys.readouterr().out
    assert "torch.compile (eager)" in printed and f"(compiled in {compiled['compile_s']:.1f} s)" in printed
    assert main(["bench", "--case", "matching_readout", "--no-memory", "--no-compile", "--json", str(target)]) == 0
    assert [r["baseline"] for r in json.loads(target.read_text())["results"]] == ["eager"]


def test_a_bench_baseline_that_fails_to_compile_is_a_row_saying_why(monkeypatch):
    from fastmeta.bench import cases, runner

    def compile_fails(fn):
        def compiled():
            raise RuntimeError("not compilable\nmore detail")

        return compiled

    monkeypatch.setitem(
        cases.CASES, "toy", lambda device: [cases.Variant("toy", "shape", lambda: None, {"eager": lambda: None})]
    )
    monkeypatch.setattr(runner.torch, "compile", compile_fails)
    eager, failed = runner.run(["toy"], "cpu", memory=False)
    assert eager["baseline"] == "eager" and eager["baseline_ms"] > 0
    assert failed["baseline"] == "torch.compile (eager)" and failed["baseline_ms"] is None and failed["speedup"] is None
    assert failed["compile_error"] == "RuntimeError: not compilable"
    assert runner.format_row(failed).endswith(
        "| torch.compile (eager)                    | failed: RuntimeError: not compilable"
    )


def test_bench_rejects_an_unknown_case(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--case", "no_such_case"])
    assert "unknown benchmark case" in capsys.readouterr().err


def test_bench_prints_each_row_as_measured_and_defaults_to_a_subset(monkeypatch, capsys):
    from fastmeta.bench import cases, runner

    assert set(cases.DEFAULT_CASES) < set(cases.CASES)
    printed_before = []

    def fake_run(names, device, memory, progress, compile):
        assert names == cases.DEFAULT_CASES and compile
        for name in names:
            printed_before.append(capsys.readouterr().out)  # what was printed before this row
            yield {
                "case": name,
                "shape": "s",
                "device": device,
                "fastmeta_ms": 1.0,
                "baseline": "b",
                "baseline_ms": 2.0,
                "speedup": 2.0,
                "fastmeta_peak_mib": None,
                "baseline_peak_mib": None,
            }

    monkeypatch.setattr(runner, "run", fake_run)
    assert main(["bench"]) == 0
    assert "(--all for every case)" in printed_before[0] and "speedup" in printed_before[0]
    assert printed_before[1].startswith(cases.DEFAULT_CASES[0])  # the first row came out on its own


def test_bench_times_fastmeta_and_its_baselines_interleaved():
    from fastmeta.bench import runner

    calls = []
    fns = [
        lambda: calls.append("fast"),
        lambda: time.sleep(0.002) or calls.append("base"),
        lambda: time.sleep(0.06) or calls.append("slow"),
    ]
    fast_s, base_s, slow_s = runner.time_callables(fns, "cpu", min_time=0, min_repeats=3)
    # two warm-up calls each, then per round one timed call of each, the short
    # ones right after an untimed call of their own
    assert calls == ["fast"] * 2 + ["base"] * 2 + ["slow"] * 2 + ["fast", "fast", "base", "base", "slow"] * 3
    assert slow_s >= 0.06 > base_s >= 0.002 > fast_s


PACKAGE = os.path.dirname(fastmeta.__file__)
MODULES = sorted(
    "fastmeta."
    + os.path.relpath(os.path.join(folder, name), PACKAGE)[:-3].replace(os.sep, ".").replace(".__init__", "")
    for folder, _, files in os.walk(PACKAGE)
    for name in files
    if name.endswith(".py") and name != "__main__.py"
)


@pytest.mark.parametrize("module", [m for m in MODULES if m.count(".") == 1])
def test_each_subpackage_imports_first_in_a_fresh_interpreter(module):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def module_level_imports():
    """Each fastmeta module's module-level imports of other fastmeta modules
    (packages excluded: importing a submodule always runs its package)."""
    import ast
    import importlib.util

    def is_module(name):
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # a name inside a module, not a module
            return False
        return spec is not None and spec.submodule_search_locations is None

    graph = {}
    for module in MODULES:
        spec = importlib.util.find_spec(module)
        package = module if spec.submodule_search_locations else module.rpartition(".")[0]
        edges = set()
        for node in ast.parse(open(spec.origin).read()).body:
            if isinstance(node, ast.ImportFrom):
                base = ("." * node.level + (node.module or "")) if node.level else node.module
                base = importlib.util.resolve_name(base, package) if node.level else base
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target.startswith("fastmeta") and is_module(target):
                        edges.add(target)
                    elif base.startswith("fastmeta") and is_module(base):
                        edges.add(base)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("fastmeta") and is_module(a.name))
        graph[module] = edges - {module}
    return graph


def test_no_import_cycle_between_modules():
    graph, state, cycles = module_level_imports(), {}, []

    def visit(module, path):
        state[module] = "open"
        for target in graph.get(module, ()):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
    assert "fastmeta.formulas" in graph and not graph["fastmeta.formulas"]  # a leaf


def test_a_forward_only_case_returns_its_outputs_so_its_compiled_baseline_computes_them(monkeypatch):
    from fastmeta.bench import cases, runner

    monkeypatch.setattr(cases, "LSTM_COORDINATES", (100,))
    variant = next(v for v in cases.lstm_step("cpu") if v.label.endswith("forward"))
    eager = next(iter(variant.baselines.values()))
    update, states = eager()
    assert update.shape == (100,) and variant.fastmeta()[0].shape == (100,)
    _, compiled, info = runner.compiled_baseline(variant, "cpu")
    compiled_update, compiled_states = compiled()
    torch.testing.assert_close(compiled_update, update)
