"""Real-format inputs offline: PKU-SafeRLHF rows with their extra columns, and scorers with another tokenizer."""

import json

import torch

import ppo_lagrangian
import train_cost
import utils

LONG = " ".join(["a very long prompt that goes on"] * 60)
PKU_ROWS = [
    {
        "prompt": prompt,
        "response_0": response_0,
        "response_1": response_1,
        "prompt_source": "Alpaca3-70B",
        "response_0_source": "Alpaca-7B",
        "response_1_source": "Alpaca2-7B",
        "is_response_0_safe": safe_0,
        "is_response_1_safe": not safe_0,
        "response_0_harm_category": {"Violence": not safe_0, "Privacy Violation": False},
        "response_1_harm_category": {"Violence": safe_0, "Privacy Violation": False},
        "response_0_severity_level": 0 if safe_0 else 2,
        "response_1_severity_level": 2 if safe_0 else 0,
        "better_response_id": better,
        "safer_response_id": 0 if safe_0 else 1,
        "response_0_sha256": "0" * 64,
        "response_1_sha256": "1" * 64,
    }
    for prompt, response_0, response_1, safe_0, better in [
        ("how do i bake bread ?", "sorry , i can not help with that .", "mix flour with water .", True, 1),
        ("how do i steal from a store ?", "pick a busy hour .", "sorry , i can not help with that .", False, 0),
        (LONG, "sure , here is how .", " ".join(["a long answer"] * 80), True, 0),
    ]
]


def test_pku_saferlhf_rows_with_their_extra_columns(tmp_path):
    path = tmp_path / "pku.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PKU_ROWS))
    rows = utils.load_rows(str(path), "preference")
    assert [r["safer_response_id"] for r in rows] == [0, 1, 0]
    assert rows[0]["response_0_harm_category"] == {"Violence": False, "Privacy Violation": False}  # kept, unused
    assert [r["prompt"] for r in utils.load_rows(str(path), "prompt")] == [r["prompt"] for r in PKU_ROWS]
    pairs = train_cost.cost_pairs(rows)
    assert [(p.more_harmful_sign, p.less_harmful_sign) for p in pairs] == [
        (1, -1),
        (1, -1),
        (1, -1),
    ]  # more harmful first, s = +1 / -1


def test_long_texts_are_cut_by_one_rule(tmp_path):
    tokenizer = utils.load_tokenizer("toy_world/model")
    row = PKU_ROWS[2]
    ids, prompt_length = utils.tokenize_conversation(tokenizer, row["prompt"], row["response_1"], 48, 32)
    assert prompt_length == 32 and len(ids) == 48  # the prompt keeps its last 32 tokens, the whole its first 48
    assert ids[0] == tokenizer.bos_token_id  # BOS stays ...
    assert tokenizer.decode(ids[:prompt_length]).endswith("ASSISTANT :")  # ... and so does the end of the prompt
    assert ids[-1] != tokenizer.eos_token_id  # cut: the score is read at the last token kept
    # Scoring generated text cuts the same way: a prompt to max_prompt_length, a response to max_new_tokens.
    scorer = utils.load_score_model("toy_world/model", tokenizer).eval()
    direct = scorer.end_scores(*utils.batch_inputs([ids], tokenizer.pad_token_id, "cpu"))
    via_text = utils.score_texts(scorer, tokenizer, [row["prompt"]], [row["response_1"]], 32, 16, ended=[False])
    assert torch.allclose(direct, via_text, atol=1e-5)


def permuted_tokenizer_and_scorer(tmp_path, tokenizer, scorer):
    """Another tokenizer (same words, other ids) and the same scorer re-indexed for it."""
    tokenizer.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    words = sorted(vocab, key=vocab.get)
    specials = words[:4]  # pad, bos, eos, unk keep their ids
    others = words[4:][::-1]
    new_vocab = {word: i for i, word in enumerate(specials + others)}
    data["model"]["vocab"] = new_vocab
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    other = utils.load_tokenizer(str(tmp_path))
    assert other.get_vocab() != tokenizer.get_vocab()
    other_scorer = utils.load_score_model("toy_world/model", other).eval()
    other_scorer.load_state_dict(scorer.state_dict())
    with torch.no_grad():
        embeddings = scorer.model.get_input_embeddings().weight
        order = [vocab[word] for word in specials + others]  # new id -> old id
        other_scorer.model.get_input_embeddings().weight.copy_(embeddings[order])
    return other, other_scorer


def test_a_scorer_with_another_tokenizer_scores_the_same_text(tmp_path):
    tokenizer = utils.load_tokenizer("toy_world/model")
    torch.manual_seed(0)
    scorer = utils.load_score_model("toy_world/model", tokenizer).eval()
    other, other_scorer = permuted_tokenizer_and_scorer(tmp_path, tokenizer, scorer)
    prompts = ["how do i bake bread ?", "i want to grow tomatoes . what should i do ?"]
    responses = ["sure , here is how to bake bread . mix flour with water .", "sorry , i can not help with that ."]
    prompt_ids = [utils.tokenize_prompt(tokenizer, p, 48) for p in prompts]
    response_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    sequences, attention_mask = utils.batch_inputs(
        [p + r for p, r in zip(prompt_ids, response_ids)], tokenizer.pad_token_id, "cpu", side="left"
    )
    same = ppo_lagrangian.end_scores(
        scorer, tokenizer, tokenizer, sequences, attention_mask, prompts, response_ids, (48, 48)
    )
    retokenised = ppo_lagrangian.end_scores(
        other_scorer, other, tokenizer, sequences, attention_mask, prompts, response_ids, (48, 48)
    )
    assert torch.allclose(same, retokenised, atol=1e-5)
    assert (same[0] - same[1]).abs() > 1e-4  # the two texts do score differently
