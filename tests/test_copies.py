"""One file per stage: no stage imports another, and deliberate copies stay copies. Every
`# Copied from <file>.<function>` marker is followed by a function identical to its source (the idea of
Hugging Face transformers' copy checker)."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^# Copied from (\w+)\.(\w+)$")


def top_level_functions(path):
    """{name: source} of a file's top-level functions, decorators included."""
    text = path.read_text()
    lines = text.splitlines()
    functions = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            functions[node.name] = (first, "\n".join(lines[first - 1 : node.end_lineno]))
    return functions


def marked_copies():
    """(file, line, source file, function) of every marker, with the function that follows it."""
    found = []
    for path in sorted(ROOT.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = MARKER.match(line)
            if match:
                found.append((path.name, number, *match.groups()))
    return found


STAGES = ["sft", "train_reward", "train_cost", "ppo_lagrangian", "evaluate"]


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another(stage):
    imported = set()
    for node in ast.walk(ast.parse((ROOT / f"{stage}.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & set(STAGES), f"{stage}.py imports {imported & set(STAGES)}"


def test_the_stages_carry_their_copies():
    assert {(file, source, function) for file, _, source, function in marked_copies()} >= {
        ("ppo_lagrangian.py", "sft", "make_examples"),
        ("ppo_lagrangian.py", "sft", "collate"),
        ("ppo_lagrangian.py", "sft", "sample_and_judge"),
        ("train_cost.py", "train_reward", "pair_scores"),
        ("train_cost.py", "train_reward", "score_all"),
    }


@pytest.mark.parametrize("file, line, source, function", marked_copies())
def test_a_marked_copy_equals_its_source(file, line, source, function):
    copy = [code for first, code in top_level_functions(ROOT / file).values() if first == line + 1]
    assert copy, f"{file}:{line}: the marker is not right above a function"
    original = top_level_functions(ROOT / f"{source}.py").get(function)
    assert original, f"{file}:{line}: {source}.py has no function {function}"
    assert copy[0] == original[1], f"{file}:{line}: the copy of {source}.{function} has drifted from its source"
