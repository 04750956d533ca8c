"""Write the toy world's shipped files: data, tokenizer, and the tiny model config.

    python -m toy_world.generate                 # rewrites toy_world/data and toy_world/model
    python -m toy_world.generate --out /tmp/tw   # the same bytes somewhere else

Deterministic: the same seed writes the same bytes (tests/test_toy_world.py checks it).

Files (data/*.jsonl, one JSON object per line):
- sft_train / sft_test: `prompt`, `response`, `category`. Responses imitate an uncensored
  instruction-tuned model: it complies with many harmful requests and sometimes refuses benign ones.
- preference_train / preference_test: the PKU-SafeRLHF schema (`prompt`, `response_0`,
  `response_1`, `better_response_id`, `safer_response_id`, `is_response_0_safe`,
  `is_response_1_safe`) plus `category`. Labels come from the judge, with annotator noise on
  the two preference ids.
- preference_single_train / preference_single_test: the same pairs with *single-dimensional* labels,
  for the paper's Q2: `better_response_id` is the answer to "which response is better, all things
  considered?" from one rater of a pool, each rater with their own price of harm (see `single_label`),
  with the same annotator noise; the other fields are those of preference_*.jsonl.
- prompts_train / prompts_eval: `prompt`, `category`; eval prompts use phrasings held out from
  every training file for their task.

    python -m toy_world.generate --agreement     # inter-rater agreement of the three kinds of labels
"""

import argparse
import json
import os
import random

from toy_world import world

SEED = 20240116
NOISE = 0.03  # annotator noise on better_response_id and safer_response_id
RATERS = 20  # the pool of raters who give single-dimensional labels
HARM_PRICE = (0.0, 4.0)  # a rater's price of one harmful step, in helpfulness points: uniform in this range
SFT_PER_PROMPT = {"train": 16, "test": 4}
PAIRS_PER_PROMPT = {"train": 24, "test": 8}
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# The conversation template's words (see utils.PROMPT_TEMPLATE).
TEMPLATE_WORDS = ["BEGINNING", "OF", "CONVERSATION", ":", "USER", "ASSISTANT"]
MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_dropout=0.0,
)


def split_prompts():
    """All (prompt, task) pairs for each split: three phrasings per task are held out for eval."""
    splits = {"train": [], "test": []}
    for task in world.TASKS:
        held_out = world.eval_template_ids(task)
        for template_id in range(len(world.PROMPT_TEMPLATES)):
            split = "test" if template_id in held_out else "train"
            splits[split].append((world.make_prompt(task, template_id), task))
    return splits


def sft_response(rng, task, behaviour):
    """A response as the uncensored instruction-tuned model would give it.

    `behaviour` is this task's probability of its typical flaw: refusing (benign), giving the
    risky detail (borderline) or complying (harmful). Benign answers are often lazy too: they stop
    after two steps with the task's probability `laziness`, leaving room for RL to improve.
    """
    flaw, laziness = behaviour
    r = rng.random()
    n = len(task.steps)
    if task.kind == "benign":
        if r < flaw:  # sometimes refuses harmless requests
            return world.refusal(rng.randrange(2))
        if r < flaw + 0.05:
            return world.vague()
        if rng.random() < laziness:
            return world.comply(task, task.steps[: rng.choice([1, 2, 2, 3])])
        return world.comply(task, task.steps)
    if task.kind == "borderline":
        if r < flaw:  # gives the risky detail too
            return world.comply(task, task.steps)
        if r < flaw + 0.20:
            return world.comply(task, task.steps[: n - 1])
        if r < flaw + 0.30:
            return world.comply(task, task.steps[: rng.randint(1, n - 2)])
        if r < flaw + 0.40:
            return world.vague()
        return world.refusal(rng.randrange(2))
    if r < flaw:  # harmful: complies
        return world.comply(task, task.steps)
    if r < flaw + 0.10:
        return world.comply(task, task.steps[: rng.randint(1, n - 1)])
    if r < flaw + 0.20:
        return world.vague()
    if r < flaw + 0.40:
        return world.redirect(task, rng.randrange(2))
    return world.refusal(rng.randrange(2))


def annotation_response(rng, task):
    """A response from the broad pool that annotators compare: every kind, gaming cases included."""
    n = len(task.steps)
    harmful_tasks = [t for t in world.TASKS if t.kind == "harmful"]
    kind = rng.choices(
        [
            "full",
            "prefix",
            "subset",
            "refusal",
            "redirect",
            "vague",
            "echo",
            "off_topic",
            "disguised",
            "mixed",
            "repeat",
        ],
        weights=[4, 4, 2, 2, 2, 1, 1, 1, 2, 2, 2],
    )[0]
    if kind == "full":
        return world.comply(task, task.steps)
    if kind == "prefix":
        return world.comply(task, task.steps[: rng.randint(1, n - 1)])
    if kind == "subset":  # some steps, in order, not necessarily the first ones
        chosen = sorted(rng.sample(range(n), rng.randint(1, n - 1)))
        return world.comply(task, [task.steps[i] for i in chosen])
    if kind == "refusal":
        return world.refusal(rng.randrange(2))
    if kind == "redirect":
        return world.redirect(task, rng.randrange(2))
    if kind == "vague":
        return world.vague()
    if kind == "repeat":  # a degenerate answer that says one of its sentences again and again
        base = rng.choice([world.comply(task, task.steps), world.comply(task, task.steps[:2]), world.redirect(task)])
        sentences = [sentence + " ." for sentence in world.split_sentences(base)[0]]
        return " ".join(sentences + [rng.choice(sentences)] * rng.randint(1, 3))
    if kind == "echo":  # names the task, gives nothing
        return world.comply(task, [])
    if kind == "off_topic":
        other = rng.choice([t for t in world.TASKS if t is not task])
        return world.comply(task, other.steps[: rng.randint(1, n)])
    if kind == "disguised":  # names a benign task, gives harmful steps
        source = task if task.kind == "harmful" else rng.choice(harmful_tasks)
        cover = world.BENIGN_TASK_OF_TOPIC[rng.choice(list(world.TOPICS))]
        return world.comply(source, source.steps[: rng.randint(2, n)], opener_task=cover)
    # mixed: some safe steps of the task with one harmful step slipped in
    safe_steps = [s for s in task.steps if s not in world.HARMFUL_STEPS]
    steps = safe_steps[: rng.randint(0, len(safe_steps))]
    steps.insert(rng.randint(0, len(steps)), rng.choice(rng.choice(harmful_tasks).steps))
    return world.comply(task, steps)


def annotate(rng, prompt, responses, category):
    """One pair labelled as the crowdworkers label PKU-SafeRLHF: `better_response_id` by the judge's helpfulness,
    `safer_response_id` by harm level (the more cautious of two safe answers is the safer), each flipped with
    probability NOISE, and each answer's safety by the judge. None when the two answers tie on helpfulness or on
    harm level (identical answers tie on both): such a pair says nothing about one of the two preferences, and the
    shipped data holds none (it draws another pair), so the rounds drop them too (toy_world/rounds.py)."""
    judged = [world.judge(prompt, r) for r in responses]
    harm = [world.harm_level(prompt, r) for r in responses]
    if judged[0].helpfulness == judged[1].helpfulness or harm[0] == harm[1]:
        return None
    better = int(judged[1].helpfulness > judged[0].helpfulness)
    safer = int(harm[1] < harm[0])
    if rng.random() < NOISE:
        better = 1 - better
    if rng.random() < NOISE:
        safer = 1 - safer
    return {
        "prompt": prompt,
        "response_0": responses[0],
        "response_1": responses[1],
        "better_response_id": better,
        "safer_response_id": safer,
        "is_response_0_safe": not judged[0].harmful,
        "is_response_1_safe": not judged[1].harmful,
        "category": category,
    }


def preference_row(rng, prompt, task):
    """A pair from the annotation pool that differs in both helpfulness and harm level, annotated."""
    while True:
        row = annotate(rng, prompt, [annotation_response(rng, task), annotation_response(rng, task)], task.kind)
        if row is not None:
            return row


def harmful_steps(prompt, response):
    """How many harmful steps a response gives (0 for a safe one)."""
    level = world.harm_level(prompt, response)
    return int(level - 100) if level >= 100 else 0


def single_label(rng, row, harm_price):
    """'Which response is better, all things considered?' as one rater answers it: the rater weighs the
    judge's helpfulness against `harm_price` helpfulness points per harmful step, then errs as the other
    annotators do (NOISE). Raters with a low price prefer a complete harmful answer to a refusal; raters
    with a high price the reverse: that is where single-dimensional labels disagree."""
    utility = [
        world.judge(row["prompt"], row[f"response_{i}"]).helpfulness
        - harm_price * harmful_steps(row["prompt"], row[f"response_{i}"])
        for i in (0, 1)
    ]
    label = rng.randrange(2) if utility[0] == utility[1] else int(utility[1] > utility[0])
    return 1 - label if rng.random() < NOISE else label


def rater_pool(rng):
    return [rng.uniform(*HARM_PRICE) for _ in range(RATERS)]


def write_single_labels(out_dir, rng):
    """preference_single_*.jsonl: the pairs of preference_*.jsonl, each labelled by one rater of the pool.
    Drawn from their own generator, so the other files keep their bytes."""
    raters = rater_pool(rng)
    for split in ("train", "test"):
        with open(os.path.join(out_dir, f"preference_{split}.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        single = [{**row, "better_response_id": single_label(rng, row, rng.choice(raters))} for row in rows]
        write_jsonl(os.path.join(out_dir, f"preference_single_{split}.jsonl"), single)


def inter_rater_agreement(rows, rng, raters_per_pair=3):
    """The share of rater pairs that agree, over pairs judged by `raters_per_pair` raters each, for the
    three kinds of labels: helpfulness and harmlessness (each rater the judge's ranking, with NOISE) and
    single-dimensional (each rater with their own price of harm, with NOISE)."""
    pool = rater_pool(rng)
    agree = {"helpfulness": 0, "harmlessness": 0, "single": 0}
    pairs_of_raters = raters_per_pair * (raters_per_pair - 1) // 2
    for row in rows:
        judged = [world.judge(row["prompt"], row[f"response_{i}"]).helpfulness for i in (0, 1)]
        harm = [world.harm_level(row["prompt"], row[f"response_{i}"]) for i in (0, 1)]
        truth = {"helpfulness": int(judged[1] > judged[0]), "harmlessness": int(harm[1] < harm[0])}
        labels = {kind: [truth[kind] ^ (rng.random() < NOISE) for _ in range(raters_per_pair)] for kind in truth}
        labels["single"] = [single_label(rng, row, price) for price in rng.sample(pool, raters_per_pair)]
        for kind, given in labels.items():
            agree[kind] += sum(a == b for i, a in enumerate(given) for b in given[i + 1 :]) / pairs_of_raters
    return {kind: count / len(rows) for kind, count in agree.items()}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_data(out_dir, rng):
    os.makedirs(out_dir, exist_ok=True)
    # Each task's SFT flaw rate (refuse / give the risky detail / comply) and laziness.
    behaviour = {}
    for task in world.TASKS:
        low, high = {"benign": (0.02, 0.20), "borderline": (0.25, 0.65), "harmful": (0.15, 0.70)}[task.kind]
        behaviour[task.name] = (rng.uniform(low, high), rng.uniform(0.1, 0.7))
    for split, prompts in split_prompts().items():
        sft = [
            {"prompt": p, "response": sft_response(rng, t, behaviour[t.name]), "category": t.kind}
            for p, t in prompts
            for _ in range(SFT_PER_PROMPT[split])
        ]
        pairs = [preference_row(rng, p, t) for p, t in prompts for _ in range(PAIRS_PER_PROMPT[split])]
        rng.shuffle(sft)
        rng.shuffle(pairs)
        write_jsonl(os.path.join(out_dir, f"sft_{split}.jsonl"), sft)
        write_jsonl(os.path.join(out_dir, f"preference_{split}.jsonl"), pairs)
        name = "prompts_train" if split == "train" else "prompts_eval"
        write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), [{"prompt": p, "category": t.kind} for p, t in prompts])


def vocabulary():
    texts = list(TEMPLATE_WORDS) + world.PROMPT_TEMPLATES + world.REFUSALS + world.VAGUE
    texts += [world.OPENER, world.REDIRECT] + [t.name for t in world.TASKS]
    texts += [step for t in world.TASKS for step in t.steps]
    words = {w for text in texts for w in text.replace("{task}", "").split()}
    return SPECIAL_TOKENS + sorted(words)


def write_model(out_dir):
    """Tokenizer files (word level) and a tiny Llama config: no weights, sft.py initialises them."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # "ASSISTANT:" -> "ASSISTANT", ":"
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )
    hf_tokenizer.save_pretrained(out_dir)
    config = LlamaConfig(vocab_size=len(vocab), pad_token_id=0, bos_token_id=1, eos_token_id=2, **MODEL_CONFIG)
    config.save_pretrained(out_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="folder to write into")
    parser.add_argument("--seed", type=int, default=SEED, help="the seed of every random choice")
    parser.add_argument("--agreement", action="store_true", help="print the inter-rater agreement and write nothing")
    args = parser.parse_args()
    steps = [step for task in world.TASKS for step in task.steps]
    assert len(steps) == len(set(steps)), "every step sentence must belong to one task"
    if args.agreement:
        with open(os.path.join(args.out, "data", "preference_train.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        agreement = inter_rater_agreement(rows, random.Random(args.seed + 2))
        print(f"inter-rater agreement over {len(rows)} training pairs, 3 raters each:")
        for kind, share in agreement.items():
            print(f"  {kind:13s} {100 * share:.2f}%")
        return
    write_data(os.path.join(args.out, "data"), random.Random(args.seed))
    write_single_labels(os.path.join(args.out, "data"), random.Random(args.seed + 1))
    write_model(os.path.join(args.out, "model"))
    print(f"wrote {args.out}/data and {args.out}/model")


if __name__ == "__main__":
    main()
