"""Real-format inputs offline: PKU-SafeRLHF rows with their extra columns, and scorers with another tokenizer."""

import json

import torch

import evaluate
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


def test_pku_saferlhf_rows_with_their_extra_columns(tmp_path, tokenizer):
    path = tmp_path / "pku.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PKU_ROWS))
    rows = utils.load_rows(str(path), "preference")
    assert [r["safer_response_id"] for r in rows] == [0, 1, 0]
    assert rows[0]["response_0_harm_category"] == {"Violence": False, "Privacy Violation": False}  # kept, unused
    assert [r["prompt"] for r in utils.load_rows(str(path), "prompt")] == [r["prompt"] for r in PKU_ROWS]
    pairs = train_cost.cost_pairs(tokenizer, rows, 64)
    assert [(p["more_harmful_sign"], p["less_harmful_sign"]) for p in pairs] == [
        (1, -1),
        (1, -1),
        (1, -1),
    ]  # more harmful first, s = +1 / -1
    unsafe = utils.tokenize_conversation(tokenizer, rows[1]["prompt"], rows[1]["response_0"], 64)[0]
    assert pairs[1]["more_harmful"] == unsafe  # row 2's unsafe response is its response_0


def test_long_texts_are_cut_by_one_rule(tokenizer, tiny_models):
    """Training and scoring cut a conversation on the right, as the original: a prompt that fills max_length leaves
    no response and no EOS. A prompt to generate from keeps its BOS and its end, "ASSISTANT:"."""
    row = PKU_ROWS[2]
    ids, prompt_length = utils.tokenize_conversation(tokenizer, row["prompt"], row["response_1"], 48)
    full, _ = utils.tokenize_conversation(tokenizer, row["prompt"], row["response_1"])
    assert len(full) > 200 and ids == full[:48] and prompt_length == 48  # the first 48, all of them prompt
    assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id
    prompt_ids, prompt_length = utils.tokenize_conversation(tokenizer, row["prompt"], None, 32)
    assert prompt_length == len(prompt_ids) == 32 and prompt_ids[0] == tokenizer.bos_token_id  # BOS stays ...
    assert tokenizer.decode(prompt_ids).endswith("on ASSISTANT :")  # ... and so does the end of the prompt
    # A cut conversation is scored at its last kept token: what the whole one scores there (attention is causal).
    scorer = utils.load_model(str(tiny_models / "reward"), tokenizer, score=True).eval()
    with torch.no_grad():
        at_48 = scorer(*utils.batch_inputs([full], tokenizer.pad_token_id, "cpu"))[0, 47]
        via_text = evaluate.score_texts(scorer, tokenizer, [row["prompt"]], [row["response_1"]], 48, ended=[False])
    assert torch.allclose(via_text, at_48, atol=1e-5)


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
    other_scorer = utils.load_model("toy_world/model", other, score=True).eval()
    other_scorer.load_state_dict(scorer.state_dict())
    with torch.no_grad():
        embeddings = scorer.model.get_input_embeddings().weight
        order = [vocab[word] for word in specials + others]  # new id -> old id
        other_scorer.model.get_input_embeddings().weight.copy_(embeddings[order])
    return other, other_scorer


def test_a_scorer_with_another_tokenizer_scores_the_same_text(tmp_path, tokenizer, tiny_models):
    """PPO reads a scorer with the actor's tokenizer on the rollout's ids; one with another tokenizer re-tokenises
    the decoded text. The same scorer under another vocabulary must give the same scores."""
    scorer = utils.load_model(str(tiny_models / "reward"), tokenizer, score=True).eval()
    other, other_scorer = permuted_tokenizer_and_scorer(tmp_path, tokenizer, scorer)
    prompts = ["how do i bake bread ?", "i want to grow tomatoes . what should i do ?"]
    responses = ["sure , here is how to bake bread . mix flour with water .", "sorry , i can not help with that ."]
    prompt_ids = [utils.tokenize_conversation(tokenizer, p, None, 48)[0] for p in prompts]
    response_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    sequences, attention_mask = utils.batch_inputs(
        [p + r for p, r in zip(prompt_ids, response_ids)], tokenizer.pad_token_id, "cpu", side="left"
    )
    with torch.no_grad():
        same = ppo_lagrangian.end_scores(
            scorer, tokenizer, tokenizer, sequences, attention_mask, prompts, response_ids, 96
        )
        retokenised = ppo_lagrangian.end_scores(
            other_scorer, other, tokenizer, sequences, attention_mask, prompts, response_ids, 96
        )
    assert torch.allclose(same, retokenised, atol=1e-5)
    assert (same[0] - same[1]).abs() > 1e-4  # the two texts do score differently
