"""One file per stage: no stage imports another, and deliberate copies stay copies. Every
`# Copied from <file>.<function>` marker is followed by a function identical to its source (the idea of
Hugging Face transformers' copy checker). And each file stays the size a reader can take in one sitting."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^# Copied from (\w+)\.(\w+)$")

# Size caps (DESIGN.md §2: utils.py tiny, each stage readable in one sitting). A change to a cap needs its reason
# in the commit message.
CAPS = {"utils.py": 500, "sft.py": 300, "train_reward.py": 300, "train_cost.py": 300, "evaluate.py": 400}
TOTAL_CAP = 2600  # the six files together
UTILS_NAMES_CAP = 45  # utils.py's top-level functions, classes and module-level assignments
MAIN_CAP = 150  # lines of ppo_lagrangian.py's main
UPDATE_CALL_CAP = 110  # the ppo_update call is at most this many lines below `def main`: the loop is seen early


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
        ("ppo_lagrangian.py", "evaluate", "score_texts"),
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


def lines(path):
    """Lines as `wc -l` counts them: newline characters."""
    return path.read_bytes().count(b"\n")


def top_level_names(path):
    """Names a module defines at its top level: functions, classes, and the targets of its assignments."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)]
    return names


def test_every_file_stays_within_its_size_cap():
    sizes = {name: lines(ROOT / name) for name in [*CAPS, "ppo_lagrangian.py"]}
    over = {name: f"{sizes[name]} lines > {cap}" for name, cap in CAPS.items() if sizes[name] > cap}
    assert not over, over
    assert sum(sizes.values()) <= TOTAL_CAP, f"{sum(sizes.values())} lines in all > {TOTAL_CAP}: {sizes}"
    names = top_level_names(ROOT / "utils.py")
    assert len(names) <= UTILS_NAMES_CAP, f"utils.py defines {len(names)} top-level names: {names}"


def test_the_ppo_loop_is_near_the_top_of_a_short_main():
    tree = ast.parse((ROOT / "ppo_lagrangian.py").read_text())
    [main] = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    length = main.end_lineno - min([main.lineno] + [d.lineno for d in main.decorator_list]) + 1
    assert length <= MAIN_CAP, f"ppo_lagrangian.main has {length} lines > {MAIN_CAP}"
    calls = [
        node.lineno for node in ast.walk(main) if isinstance(node, ast.Call) and ast.unparse(node.func) == "ppo_update"
    ]
    assert calls and min(calls) - main.lineno <= UPDATE_CALL_CAP, (
        f"ppo_update called at {calls}, def main at {main.lineno}"
    )
