"""Regenerates tiny_instructions.jsonl: a small, learnable instruction set (no hub, no network).

    python sloth_plugins/data/make_instructions.py > sloth_plugins/data/tiny_instructions.jsonl

Not part of the installed package (only the .jsonl is package data).
"""
import json
import random

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden", "window",
         "silver", "forest", "candle", "bridge", "planet", "orange", "butter", "meadow", "pencil", "island"]
OPPOSITES = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("early", "late"),
             ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("full", "empty"), ("old", "new")]


def examples(rng: random.Random):
    for _ in range(120):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        yield f"Add {a} and {b}.", f"{a} + {b} = {a + b}."
    for _ in range(80):
        w = rng.choice(WORDS)
        yield f"Reverse the word '{w}'.", f"The reverse of '{w}' is '{w[::-1]}'."
    for _ in range(80):
        nums = rng.sample(range(1, 50), rng.randint(3, 7))
        yield f"Sort these numbers: {', '.join(map(str, nums))}.", f"Sorted: {', '.join(map(str, sorted(nums)))}."
    for _ in range(60):
        w, o = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            w, o = o, w
        yield f"What is the opposite of '{w}'?", f"The opposite of '{w}' is '{o}'."
    for _ in range(60):
        words = rng.sample(WORDS, rng.randint(2, 5))
        yield f"Write in capitals: {' '.join(words)}.", " ".join(words).upper() + "."


def main():
    rng = random.Random(1234)
    rows = list(examples(rng))
    rng.shuffle(rows)
    for instruction, response in rows:
        print(json.dumps({"instruction": instruction, "response": response}))


if __name__ == "__main__":
    main()
