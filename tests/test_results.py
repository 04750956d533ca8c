"""Every measured number has one source: the generated blocks of the README and docs equal what bench/results.py
renders from results/*.json, and a measured-looking number outside the blocks (a decimal or a percentage in prose) must
be one the blocks hold, a setting the code holds, or a number quoted from the paper."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import results  # noqa: E402

NUMBER = re.compile(r"(?<![\w.])\d+\.\d+%?|(?<![\w.])\d+%")
QUOTED = {  # numbers quoted from elsewhere, not measured here
    "the paper's rater agreement": {"61.65%", "69.00%", "66.53%"},
    "the paper's Fig. 5 and Table 1": {"244.91", "268.31", "363.86", "237.98", "53.08%", "2.45%", "78.13%", "75.73%",
                                       "77.32%", "95.62%", "84.54%", "85.88%"},  # fmt: skip
    "versions and arXiv ids": {"1.12", "1.13", "2.13.0", "5.24.0", "2310.12773", "2410.19933", "2.0", "3.10"},
    "the toy model's size, from its config": {"0.69"},
}  # fmt: skip


def prose(text):
    """The text outside the generated blocks, code blocks, inline code and link targets."""
    text = results.BLOCK.sub("", text)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def code_numbers():
    """Every number written in the code, the scripts and the requirements: settings, not measurements."""
    found = set()
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*/*.py"), *ROOT.glob("*.sh"), *ROOT.glob("*/*.txt")]:
        found |= set(NUMBER.findall(path.read_text()))
    return found | {number + "%" for number in found}


@pytest.mark.parametrize("document", results.DOCUMENTS)
def test_the_blocks_are_rendered_from_the_results(document):
    text = (ROOT / document).read_text()
    assert results.render(text, results.all_results()) == text, f"run `python bench/results.py` ({document})"


def test_no_measured_number_lives_outside_the_blocks():
    documents = {name: (ROOT / name).read_text() for name in results.DOCUMENTS}
    in_blocks = {n for text in documents.values() for b in results.BLOCK.findall(text) for n in NUMBER.findall(b[2])}
    allowed = in_blocks | code_numbers() | set().union(*QUOTED.values())
    stray = {name: sorted(set(NUMBER.findall(prose(text))) - allowed) for name, text in documents.items()}
    assert not any(stray.values()), {name: numbers for name, numbers in stray.items() if numbers}
