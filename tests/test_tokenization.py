"""Our token ids are the original's, with real tokenizers (issue 20, item 1).

The original (PKU-Alignment/safe-rlhf, safe_rlhf/datasets/*.py) tokenises `template(prompt) + response + eos_token`
as ONE string with the tokenizer's special tokens (BOS for Llama), cut on the right at max_length; its SFT labels
mask the first len(tokenize(template(prompt))) tokens, the prompt tokenised alone, whether or not those are a prefix
of the whole. A released model (alpaca-7b-reproduced, beaver-7b-*) was trained on exactly these ids. The reference
below is that procedure written out again, independently of utils; each stage's tokenisation must give its ids.

The tokenizers are real ones (../shared/tokenizers/README.md): Llama-2's SentencePiece, which Alpaca-7B and the
beaver-7b judges use, and Qwen2's byte-level BPE. On both, tokenising prompt and response apart gives other ids at
the boundary (the last test), so these tests can tell the two ways apart.
"""

import os

import pytest
import torch
import transformers

import evaluate
import sft
import train_cost
import train_reward
import utils

TOKENIZERS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tokenizers")
if not os.path.isdir(TOKENIZERS):  # they live beside the repository, in the project's workspace
    pytest.skip(f"no real tokenizers in {os.path.normpath(TOKENIZERS)}", allow_module_level=True)
TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"  # safe_rlhf/configs/constants.py, one turn
MAX_LENGTH = 40
LONG_PROMPT = " ".join(["Tell me everything about the history of bread, in every country and century."] * 6)
LONG_RESPONSE = " ".join(["Mix flour, water and salt; knead it for ten minutes, then let it rise."] * 6)
PROMPT = "How do I bake bread?"
# Responses that begin in every way a tokenizer treats differently after "ASSISTANT:": a word it may merge with
# the colon, a capital, a space, a digit, punctuation, a newline, non-ASCII, nothing at all; then long ones.
CASES = [
    (PROMPT, "sure, here is how."),
    (PROMPT, "I can help with that."),
    (PROMPT, "The oven must be hot."),
    (PROMPT, "A loaf needs flour."),
    (PROMPT, "mix flour with water."),
    (PROMPT, " Mix flour with water."),
    (PROMPT, "3 cups of flour."),
    (PROMPT, "!?"),
    (PROMPT, ", then bake it."),
    (PROMPT, "\nFirst, mix."),
    (PROMPT, "éclairs are easier."),
    (PROMPT, "日本のパンは柔らかい。"),
    (PROMPT, ""),
    ("Wie backe ich Brot? ¿Y tú?", "Mit Mehl und Wasser."),
    (PROMPT, LONG_RESPONSE),  # cut at MAX_LENGTH inside the response
    (LONG_PROMPT, "sure, here is how."),  # the prompt alone fills MAX_LENGTH
]


# ----------------------------------------------------------------------------- the original's procedure


def original_ids(tokenizer, prompt, response, max_length, eos=True):
    """safe_rlhf's tokenize(text): the whole conversation as one string, special tokens added, cut on the right."""
    text = TEMPLATE.format(prompt=prompt) + response + (tokenizer.eos_token if eos else "")
    return tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]


def original_labels(tokenizer, prompt, response, max_length):
    """safe_rlhf's SupervisedDataset: labels[:len(tokenize(prompt))] = IGNORE_INDEX, the prompt tokenised alone."""
    labels = original_ids(tokenizer, prompt, response, max_length)
    prompt_ids = tokenizer(TEMPLATE.format(prompt=prompt), truncation=True, max_length=max_length)["input_ids"]
    n_masked = min(len(prompt_ids), len(labels))
    return [-100] * n_masked + labels[n_masked:]


@pytest.fixture(scope="module", params=["llama-2-spm", "qwen2"])
def tokenizers(request):
    """(name, the tokenizer as transformers loads it: the reference's, ours as utils loads it: the stages')."""
    path = os.path.join(TOKENIZERS, request.param)
    return request.param, transformers.AutoTokenizer.from_pretrained(path), utils.load_tokenizer(path)


def test_the_cases_reach_every_branch(tokenizers):
    """Some conversations fit, one is cut inside its response, one has a prompt that fills max_length alone."""
    _, original, _ = tokenizers
    whole = [len(original_ids(original, p, r, None)) for p, r in CASES]
    prompts = [len(original(TEMPLATE.format(prompt=p))["input_ids"]) for p, _ in CASES]
    assert whole[0] < MAX_LENGTH  # fits
    assert prompts[-2] < MAX_LENGTH < whole[-2]  # the long response is cut
    assert prompts[-1] > MAX_LENGTH  # the long prompt fills it


# ----------------------------------------------------------------------------- each stage's ids


def test_tokenize_conversation_gives_the_originals_ids_and_prompt_length(tokenizers):
    _, original, ours = tokenizers
    for prompt, response in CASES:
        ids, n_prompt = utils.tokenize_conversation(ours, prompt, response, MAX_LENGTH)
        assert ids == original_ids(original, prompt, response, MAX_LENGTH), (prompt[:20], response[:20])
        labels = original_labels(original, prompt, response, MAX_LENGTH)
        assert n_prompt == labels.count(-100), (prompt[:20], response[:20])


def test_sft_labels_are_the_originals(tokenizers):
    """Ids and labels as the original's; a row with no response token left is dropped (the original keeps it,
    with every label masked: it adds nothing to the loss)."""
    _, original, ours = tokenizers
    for prompt, response in CASES:
        examples = sft.make_examples(ours, [{"prompt": prompt, "response": response}], MAX_LENGTH)
        labels = original_labels(original, prompt, response, MAX_LENGTH)
        if set(labels) == {-100}:
            assert examples == [] and prompt == LONG_PROMPT
        else:
            assert examples == [(original_ids(original, prompt, response, MAX_LENGTH), labels)], response[:20]


def preference_rows():
    """The cases two by two, as PKU-SafeRLHF rows; the better and the safer response alternate."""
    rows = []
    for i in range(0, len(CASES) - 1, 2):
        (prompt, response_0), (_, response_1) = CASES[i], CASES[i + 1]
        safer = (i // 2) % 2
        rows.append(
            dict(prompt=prompt, response_0=response_0, response_1=response_1, better_response_id=1 - safer)
            | dict(safer_response_id=safer, is_response_0_safe=safer == 0, is_response_1_safe=safer == 1)
        )
    return rows


def test_reward_and_cost_pairs_are_the_originals(tokenizers):
    """safe_rlhf's PreferenceDataset and SafetyPreferenceDataset tokenise each response as the SFT data."""
    _, original, ours = tokenizers
    rows = preference_rows()
    reward_pairs = train_reward.reward_pairs(ours, rows, MAX_LENGTH)
    cost_pairs = train_cost.cost_pairs(ours, rows, MAX_LENGTH)
    assert len(reward_pairs) == len(cost_pairs) == len(rows) == 8
    for row, reward_pair, cost_pair in zip(rows, reward_pairs, cost_pairs):
        ids = [original_ids(original, row["prompt"], row[f"response_{k}"], MAX_LENGTH) for k in (0, 1)]
        better, safer = row["better_response_id"], row["safer_response_id"]
        assert reward_pair == {"better": ids[better], "worse": ids[1 - better]}
        assert cost_pair["more_harmful"] == ids[1 - safer] and cost_pair["less_harmful"] == ids[safer]


class RecordingScorer(torch.nn.Module):
    """Stands in for a ScoreModel: notes the unpadded ids of every row it is asked to score, scores 0."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # score_texts finds the device from a parameter
        self.seen = []

    def forward(self, input_ids, attention_mask, end=False):
        assert end
        self.seen += [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
        return torch.zeros(len(input_ids))


def test_evaluate_scores_the_originals_ids(tokenizers):
    """A scorer reads what the original's would: the conversation as one string, with EOS after an answer that
    ended and without it after one that was cut, padding not among the ids."""
    _, original, ours = tokenizers
    prompts, responses = zip(*CASES)
    ended = [i % 3 != 1 for i in range(len(CASES))]
    scorer = RecordingScorer()
    scores = evaluate.score_texts(scorer, ours, list(prompts), list(responses), MAX_LENGTH, ended, batch_size=5)
    assert scores.shape == (len(CASES),)
    assert scorer.seen == [original_ids(original, p, r, MAX_LENGTH, e) for p, r, e in zip(prompts, responses, ended)]
    assert any(not e for e in ended) and any(len(ids) < MAX_LENGTH for ids in scorer.seen)  # padded, and unended
    scorer.seen = []
    evaluate.score_texts(scorer, ours, list(prompts), list(responses), MAX_LENGTH)  # ended: all, by default
    assert scorer.seen == [original_ids(original, p, r, MAX_LENGTH) for p, r in CASES]


ADDS_BOS = {"llama-2-spm": True, "qwen2": False}  # Llama's post-processor adds <s>; Qwen2's adds nothing


def test_the_generation_prompt_is_the_template_with_bos_and_a_long_one_keeps_its_end(tokenizers):
    """response=None: the ids the policy generates from, template(prompt) with the tokenizer's BOS. A prompt longer
    than max_length keeps its BOS and its last tokens, so "ASSISTANT:" stays next to the answer to come (here we
    differ on purpose: the original's PromptOnlyDataset cuts on the right and loses it)."""
    name, original, ours = tokenizers
    short = original(TEMPLATE.format(prompt=PROMPT))["input_ids"]
    assert (short[0] == original.bos_token_id) == ADDS_BOS[name]
    assert utils.tokenize_conversation(ours, PROMPT, None, MAX_LENGTH) == (short, len(short))
    full = original(TEMPLATE.format(prompt=LONG_PROMPT))["input_ids"]
    assert len(full) > MAX_LENGTH
    expected = [original.bos_token_id] + full[-(MAX_LENGTH - 1) :] if ADDS_BOS[name] else full[-MAX_LENGTH:]
    ids, n_prompt = utils.tokenize_conversation(ours, LONG_PROMPT, None, MAX_LENGTH)
    assert ids == expected and n_prompt == MAX_LENGTH
    assert original.decode(ids, skip_special_tokens=True).endswith("ASSISTANT:")


# ----------------------------------------------------------------------------- the tests can tell


# The cases that tokenise alike both ways: where the response starts a token of its own (a space, nothing, or for
# Qwen2 a character its BPE never merges with the colon). Every other case differs.
ALIKE_BOTH_WAYS = {
    "llama-2-spm": [" Mix flour with water.", ""],
    "qwen2": [" Mix flour with water.", "3 cups of flour.", "!?", "éclairs are easier.", "日本のパンは柔らかい。"]
    + ["", "Mit Mehl und Wasser."],
}


def test_prompt_and_response_tokenised_apart_give_other_ids(tokenizers):
    """The old way (template and response tokenised apart, then joined) differs from the original's on these
    tokenizers: the tests above would catch a return to it. Llama-2's SentencePiece reads "sure" after the colon
    as 's', 'ure', but alone as '▁sure'; Qwen2's BPE even merges the colon with the response's first letter, so
    the prompt alone is not a prefix of the whole (and the original masks its length all the same)."""
    name, original, _ = tokenizers
    alike = []
    for prompt, response in CASES[:-2]:
        apart = original(TEMPLATE.format(prompt=prompt))["input_ids"]
        apart += original(response, add_special_tokens=False)["input_ids"] + [original.eos_token_id]
        if apart == original_ids(original, prompt, response, None):
            alike.append(response)
    assert alike == ALIKE_BOTH_WAYS[name]
    sure = original_ids(original, PROMPT, "sure, here is how.", None)
    n_prompt = len(original(TEMPLATE.format(prompt=PROMPT))["input_ids"])
    boundary = original.convert_ids_to_tokens(sure[n_prompt - 1 : n_prompt + 1])
    assert boundary == {"llama-2-spm": [":", "s"], "qwen2": [":s", "ure"]}[name]
