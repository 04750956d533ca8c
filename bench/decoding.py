"""Decoding, measured: utils.generate (transformers' generate with the KV cache) against a short hand-written KV-cache
loop that draws the same tokens (greedy: the same argmax; sampling: the same softmax(logits / T) and the same
torch.multinomial draws), on the toy model and on a ~100M-parameter Llama config, at batch 48 and 128.

    python bench/decoding.py                       # prints tokens/s and the ratio; results/decoding.json
    python bench/decoding.py --sizes toy --batches 48 --repeats 2

Prompts are random ordinary tokens (48 each), answers 48 new tokens; the random weights never stop early, so every
row decodes all 48 steps. Each timing is the median of --repeats runs after one warm-up, the two loops interleaved.
tests/test_utils.py checks that the hand loop gives utils.generate's tokens, greedy and sampled.
"""

import argparse
import functools
import os
import statistics
import sys
import time

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import results  # noqa: E402, I001
import utils  # noqa: E402

SIZES = {  # name: Llama config changes (the toy's own config for "toy")
    "toy": {},
    "100M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=False),
}  # fmt: skip


@torch.no_grad()
def hand_generate(model, tokenizer, prompt_ids, max_new_tokens, temperature=1.0, greedy=False):
    """utils.generate written out: left-padded prompts, one forward pass per new token on the KV cache, padding after
    each row's EOS; stops when every row has ended. Returns (sequences, prompt length) as utils.generate does."""
    input_ids, attention_mask = utils.batch_inputs(prompt_ids, tokenizer.pad_token_id, model.device, "left")
    positions, cache = utils.position_ids(attention_mask), transformers.DynamicCache(config=model.config)
    tokens, finished, step_input = [], torch.zeros(len(prompt_ids), dtype=torch.bool), input_ids
    for _ in range(max_new_tokens):
        logits = model(step_input, attention_mask=attention_mask, position_ids=positions, past_key_values=cache).logits
        scores = logits[:, -1].float()
        if greedy:
            token = scores.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(scores / temperature, -1), num_samples=1)[:, 0]
        token = torch.where(finished, tokenizer.pad_token_id, token)
        tokens.append(token)
        finished |= token == tokenizer.eos_token_id
        if finished.all():
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        positions, step_input = positions[:, -1:] + 1, token[:, None]
    return torch.cat([input_ids, torch.stack(tokens, 1)], dim=1), input_ids.shape[1]


def model_of_size(size, tokenizer):
    config = transformers.AutoConfig.from_pretrained(os.path.join(ROOT, "toy_world", "model"))
    for key, value in SIZES[size].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return model


def timed(functions, repeats):
    """Median seconds per call of each function, called in turn (A B A B ...) after one warm-up call each."""
    seconds = {name: [] for name in functions}
    for repeat in range(repeats + 1):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            seconds[name] += [time.perf_counter() - started] if repeat else []
    return {name: statistics.median(values) for name, values in seconds.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--batches", type=int, nargs="+", default=[48, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=48)
    args = parser.parse_args()
    tokenizer = utils.load_tokenizer(os.path.join(ROOT, "toy_world", "model"))
    rows = []
    print(f"{'model':<8}{'batch':>6}{'generate tok/s':>16}{'hand loop tok/s':>17}{'hand / generate':>17}  same tokens")
    for size in args.sizes:
        model = model_of_size(size, tokenizer)
        ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids])
        for batch in args.batches:
            generator = torch.Generator().manual_seed(batch)
            prompts = ordinary[torch.randint(len(ordinary), (batch, 48), generator=generator)].tolist()
            prompts = [[tokenizer.bos_token_id, *p] for p in prompts]
            same = []
            for greedy in (True, False):
                torch.manual_seed(1)
                ours, _ = utils.generate(model, tokenizer, prompts, args.new_tokens, greedy=greedy)
                torch.manual_seed(1)
                hand, _ = hand_generate(model, tokenizer, prompts, args.new_tokens, greedy=greedy)
                same.append(torch.equal(ours, hand))
            calls = {name: functools.partial(f, model, tokenizer, prompts, args.new_tokens)
                     for name, f in (("generate", utils.generate), ("hand", hand_generate))}  # fmt: skip
            seconds = timed(calls, args.repeats)
            rates = {name: batch * args.new_tokens / s for name, s in seconds.items()}
            row = dict(model=size, batch=batch, parameters=sum(p.numel() for p in model.parameters()))
            row.update(generate_tokens_per_s=rates["generate"], hand_tokens_per_s=rates["hand"])
            row.update(ratio=rates["hand"] / rates["generate"], same_greedy=same[0], same_sampled=same[1])
            rows.append(row)
            print(f"{size:<8}{batch:>6}{rates['generate']:>16,.0f}{rates['hand']:>17,.0f}{row['ratio']:>17.2f}  {same}")
    threads = torch.get_num_threads()
    results.save("decoding", {**results.stamp(), "threads": threads, "new_tokens": args.new_tokens, "rows": rows})


if __name__ == "__main__":
    main()
