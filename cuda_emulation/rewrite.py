"""Copies a csrc/ tree for the CUDA emulation layer, rewriting the three
constructs a C++ compiler cannot take: kernel launches
(``kernel<<<grid, block, shared, stream>>>(args)``), ``extern __shared__``
arrays and ``__shared__`` variables. Every other line is kept, and line
numbers with it (each file starts with a #line naming the original), so
compiler errors and sanitizer reports point at the original source.

Usage: python rewrite.py SOURCE_CSRC DESTINATION
"""

import re
import shutil
import sys
from pathlib import Path

DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?(?P<type>[\w:\s]+?)\s+"
    r"(?P<name>\w+)\s*\[\s*\]\s*;"
)
STATIC_SHARED = re.compile(
    r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?(?P<type>[\w:<>,\s]+?)\s+"
    r"(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]+\]\s*)*);"
)


def split_top_level(text: str):
    """``text`` split at the commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def matching_parenthesis(text: str, opening: int) -> int:
    depth = 0
    for i in range(opening, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced parentheses after a launch")


def rewrite_launches(text: str) -> str:
    while (start := text.find("<<<")) >= 0:
        boundary = max(text.rfind(c, 0, start) for c in ";{}")
        kernel_start = boundary + 1
        while text[kernel_start].isspace():
            kernel_start += 1
        kernel = text[kernel_start:start].strip()
        end = text.index(">>>", start)
        config = split_top_level(text[start + 3 : end])
        if not 2 <= len(config) <= 4:
            raise ValueError(f"a launch configuration of {len(config)} parts: {config}")
        config += ["0", "nullptr"][len(config) - 2 :]
        opening = end + 3
        while text[opening].isspace():
            opening += 1
        if text[opening] != "(":
            raise ValueError(f"no arguments after the launch of {kernel}")
        closing = matching_parenthesis(text, opening)
        arguments = text[opening + 1 : closing].strip()
        call = (
            f"::cuda_emulation::launch({kernel}, dim3({config[0]}), dim3({config[1]}), "
            f"static_cast<size_t>({config[2]}), {config[3]}{', ' if arguments else ''}{arguments})"
        )
        call = " ".join(call.split())
        newlines = text.count("\n", kernel_start, closing + 1)
        text = text[:kernel_start] + call + "\n" * newlines + text[closing + 1 :]
    return text


def rewrite(text: str) -> str:
    text = rewrite_launches(text)
    text = DYNAMIC_SHARED.sub(
        lambda m: f"{m['type']}* {m['name']} = ::cuda_emulation::dynamic_shared<{m['type']}>();", text
    )
    return STATIC_SHARED.sub(
        lambda m: (
            f"auto& {m['name']} = ::cuda_emulation::block_shared<"
            f"{m['type']}{''.join(m['dims'].split())}>(__FILE__, __LINE__);"
        ),
        text,
    )


def main(source: str, destination: str):
    source_dir, destination_dir = Path(source).resolve(), Path(destination)
    if destination_dir.exists():
        shutil.rmtree(destination_dir)
    shutil.copytree(source_dir, destination_dir)
    for path in sorted((destination_dir / "cuda").glob("*.cu*")):
        original = source_dir / path.relative_to(destination_dir)
        text = rewrite(path.read_text())
        if "<<<" in text or "__shared__" in text:
            raise SystemExit(f"{original}: a launch or __shared__ declaration was not rewritten")
        path.write_text(f'#line 1 "{original}"\n{text}')


if __name__ == "__main__":
    main(*sys.argv[1:])
