"""Build the embedded defaults once, from a fixed seed: the arithmetic dataset and a small LLaMA.

    python launch/make_tiny_llama.py [--pretrain_steps 1500]

Writes speft_ds/assets/arithmetic.jsonl (prompt/response word problems), arithmetic_test.jsonl (a generation
task held out by operation and operands, the operands of + and * unordered: prompt/answer) and
speft_ds/assets/tiny-llama/
(an ordinary HF model directory: config, tokenizer trained with `tokenizers`, safetensors weights).
The model is briefly pretrained on generated sentences and equations, never on the question/answer
format, so that fine-tuning on the dataset has something to learn.

The dataset is the main job's (on SmolLM2-135M-Instruct): 720 examples are one epoch of 42 steps on 2 ranks,
which keeps that job within 15 minutes on 2 CPU cores. Addition, subtraction and multiplication come
equally often, so no single rule applied to the question's numbers answers more than about a third of
the held-out task.
"""

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parents[1] / "speft_ds" / "assets"
NAMES = ["Tom", "Anna", "Ravi", "Mei", "Omar", "Lena", "Sam", "Ines", "Kofi", "Yuki", "Ben", "Sara"]
THINGS = ["apples", "books", "coins", "pens", "cards", "stones", "shells", "stamps", "eggs", "marbles"]
SPECIAL = ["<pad>", "<s>", "</s>"]


def word_problem(rng: random.Random) -> tuple[tuple, dict]:
    """(operation and operands, the example): the key the held-out split is disjoint by, with the operands of
    + and * in ascending order, so a held-out 3 * 7 also keeps 7 * 3 out of training."""
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        key, answer = ("+", min(a, b), max(a, b)), a + b
        prompt = f"{name} has {a} {thing}. {name} gets {b} more from {other}. How many {thing} does {name} have now?"
        response = f"{a} + {b} = {a + b}. {name} has {a + b} {thing}."
    elif kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        key, answer = ("-", a, b), a - b
        prompt = f"{name} had {a} {thing} and gave {b} to {other}. How many {thing} does {name} have left?"
        response = f"{a} - {b} = {a - b}. {name} has {a - b} {thing} left."
    else:
        # 2-12 bags of 2-25: held-out unordered pairs then leave most products to train on
        a, b = rng.randint(2, 12), rng.randint(2, 25)
        key, answer = ("*", min(a, b), max(a, b)), a * b
        prompt = f"{name} fills {a} bags with {b} {thing} each. How many {thing} are in the bags?"
        response = f"{a} * {b} = {a * b}. The bags hold {a * b} {thing}."
    return key, {"prompt": f"Question: {prompt}\nAnswer:", "response": f" {response}", "answer": str(answer)}


def split_problems(rng: random.Random, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Training examples, and held-out ones whose (operation, operands) no training example has, in either
    order: the test asks for sums and products the model never saw worked, not the same ones in other words
    or with the operands swapped."""
    test, test_keys = [], set()
    while len(test) < n_test:
        key, example = word_problem(rng)
        if key not in test_keys:
            test_keys.add(key)
            test.append({"prompt": example["prompt"], "answer": example["answer"], "stop": ["\n"]})
    train = []
    while len(train) < n_train:
        key, example = word_problem(rng)
        if key not in test_keys:
            train.append({"prompt": example["prompt"], "response": example["response"]})
    return train, test


def pretraining_text(rng: random.Random) -> str:
    """Sentences and equations in the dataset's vocabulary, without its question/answer format."""
    a, b = rng.randint(1, 90), rng.randint(1, 90)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    return rng.choice([f"{a} {op} {b} = {value}.", f"{name} has {a} {thing}.", f"{name} gave {b} {thing} away.",
                       f"The bags hold {a} {thing}.", f"{name} has {a} {thing} and {b} more {thing}."])


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.normalizer = normalizers.NFKC()
    # Single digits keep arithmetic learnable for a small model. The word-boundary mark goes only before the
    # text's first piece and after spaces, not before every digit: "90" is "9", "0" and decodes as "90".
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.Metaspace(prepend_scheme="first")])
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL,
                                                             show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=256)


def pretrain(model: LlamaForCausalLM, tokenizer, texts: list[str], steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    ids = [tokenizer.bos_token_id] + sum(
        (tokenizer.encode(" " + t, add_special_tokens=False) for t in texts), [])
    stream = torch.tensor(ids)
    block, batch = 64, 32
    model.train()
    for step in range(steps):
        starts = torch.randint(0, stream.numel() - block - 1, (batch,))
        x = torch.stack([stream[s:s + block] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=720)
    parser.add_argument("--test_examples", type=int, default=200)
    parser.add_argument("--pretrain_steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    examples, held_out = split_problems(rng, args.examples, args.test_examples)
    corpus = [pretraining_text(rng) for _ in range(20000)]
    for name, rows in (("arithmetic.jsonl", examples), ("arithmetic_test.jsonl", held_out)):
        with (ASSETS / name).open("w") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in rows)

    tokenizer = build_tokenizer(corpus + [e["prompt"] + e["response"] for e in examples])
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer, corpus, args.pretrain_steps, args.seed)
    out = ASSETS / "tiny-llama"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
