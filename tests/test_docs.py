"""Every code block of the README and the docs runs: each Python block is
executed on its own, and each shell line is checked (a `fastmeta` command
line parses, a `make` target exists, a script named exists)."""

import re
import shlex
from pathlib import Path

import pytest

from fastmeta.__main__ import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    ROOT / "CONTRIBUTING.md",
    ROOT / "cuda_emulation" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]


def blocks(language):
    found = []
    for page in PAGES:
        for i, block in enumerate(re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)):
            found.append(pytest.param(block, id=f"{page.relative_to(ROOT)}:{i}"))
    return found


def shell_lines(block):
    """The block's commands, continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [
        line.split(" #")[0].strip()
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


@pytest.mark.parametrize("block", blocks("python"))
def test_python_block_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "<docs>", "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("block", blocks("bash"))
def test_shell_block_names_what_exists(block):
    makefile = (ROOT / "Makefile").read_text()
    for line in shell_lines(block):
        words = shlex.split(line)
        while words and "=" in words[0]:  # VARIABLE=value prefixes
            words = words[1:]
        if "-m" in words and words[words.index("-m") + 1] == "fastmeta":  # torchrun ... -m fastmeta ...
            words = ["fastmeta"] + words[words.index("-m") + 2 :]
        if words[0].endswith("/fastmeta"):  # .venv/bin/fastmeta
            words[0] = "fastmeta"
        if words[0] == "fastmeta":
            build_parser().parse_args(words[1:])  # exits (SystemExit) on an unknown command or flag
        elif words[0] == "make":
            for target in (w for w in words[1:] if "=" not in w):
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target}"
        elif words[0] in ("python", "python3") and words[1].endswith(".py"):
            assert (ROOT / words[1]).exists(), f"{words[1]} does not exist"
        elif words[0].startswith(("./", ".ci/", "cuda_emulation/", "benchmarks/")):
            assert (ROOT / words[0]).exists(), f"{words[0]} does not exist"


@pytest.mark.parametrize("module", ["anil", "batched_maml", "imaml", "maml", "meta_sgd", "reptile"])
def test_each_algorithm_names_its_paper_and_its_docstring_example_runs(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"fastmeta.algorithms.{module}")
    assert re.search(r", (19|20)\d\d\)", mod.__doc__), "the paper: title, authors, year"
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
