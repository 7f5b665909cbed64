"""fastmeta bench: the torch.compile baseline beside the eager ones, its
compile time apart, and a baseline that fails to compile reported, not fatal."""

import json

from fastmeta.__main__ import main
from fastmeta.bench import cases, runner


def test_every_case_gains_a_compiled_baseline_with_its_compile_time(tmp_path, capsys):
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


def test_a_baseline_that_fails_to_compile_is_a_row_saying_why(monkeypatch):
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
