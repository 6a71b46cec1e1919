"""Write the small datasets shipped in training/data/ (deterministic: same files on every run).

    python training/data/make_data.py            # rewrites the files next to this script

Tasks were picked so their effect is measurable automatically:

- SFT (sft.jsonl, sft_chat.jsonl): every reply has the fixed format ``ANSWER: <answer>``.
  Measure: share of replies that start with ``ANSWER:`` (base SmolLM2: none).
- Preferences (prefs.jsonl): chosen = the concise ``ANSWER: <answer>`` reply, rejected = the
  same answer without the format, either as a short reply or a rambling, hedging one. Measure: held-out pairwise accuracy of the reward
  model; for DPO/GRPO policies the ANSWER-format share.
- RL prompts (prompts.jsonl): questions only; eval_prompts.jsonl: held-out questions used by
  the demo and by evaluations (never in any training file).
- CPT (cpt.txt): encyclopedia paragraphs about a fictional archipelago (names no model knows).
  Measure: loss on held-out paragraphs (cpt_eval.txt) drops.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow",
    "Australia": "Canberra", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Morocco": "Rabat",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
    "early": "late", "open": "closed", "full": "empty", "strong": "weak", "high": "low", "old": "young",
    "rich": "poor", "wet": "dry", "hard": "soft", "loud": "quiet", "first": "last", "inside": "outside",
    "true": "false", "day": "night", "win": "lose", "push": "pull", "buy": "sell", "thick": "thin",
    "wide": "narrow", "deep": "shallow", "heavy": "light", "clean": "dirty", "sweet": "sour", "near": "far",
}
COLOURS = {
    "a ripe banana": "yellow", "fresh grass": "green", "the clear daytime sky": "blue", "snow": "white",
    "coal": "black", "a ripe tomato": "red", "a carrot": "orange", "milk": "white", "an emerald": "green",
    "a lemon": "yellow", "a raven": "black", "a pumpkin": "orange", "a strawberry": "red",
}
ANIMAL_SOUNDS = {
    "a dog": "bark", "a cat": "meow", "a cow": "moo", "a duck": "quack", "a sheep": "baa", "a lion": "roar",
    "a horse": "neigh", "a pig": "oink", "an owl": "hoot", "a snake": "hiss", "a frog": "croak",
}
WORDS = ["apple", "river", "window", "garden", "silver", "planet", "pencil", "rocket", "forest", "candle",
         "bridge", "mirror", "orange", "pocket", "thunder", "violin", "harbor", "lantern", "meadow", "puzzle"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]


def questions(rng: random.Random) -> list[tuple[str, str]]:
    """(question, short answer) pairs across several kinds; answers are exact."""
    qa: list[tuple[str, str]] = []
    for country, city in CAPITALS.items():
        qa.append((rng.choice(["What is the capital of {}?", "Which city is the capital of {}?",
                               "Name the capital city of {}."]).format(country), city))
    for word, opposite in OPPOSITES.items():
        qa.append((rng.choice(["What is the opposite of '{}'?", "Give the antonym of '{}'."]).format(word), opposite))
    for thing, colour in COLOURS.items():
        qa.append((f"What colour is {thing}?", colour))
    for animal, sound in ANIMAL_SOUNDS.items():
        qa.append((f"What sound does {animal} make?", sound))
    for word in WORDS:
        qa.append((f"Write the word '{word}' in capital letters.", word.upper()))
        qa.append((f"How many letters are in the word '{word}'?", str(len(word))))
    for _ in range(150):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        op = rng.choice(["plus", "minus", "times"])
        if op == "times":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        elif op == "minus" and a < b:
            a, b = b, a
        value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        qa.append((rng.choice(["What is {} {} {}?", "Compute {} {} {}.", "Calculate {} {} {}."]).format(a, op, b),
                   str(value)))
    for n in range(1, 12):
        qa.append((f"Write the number {n} as a word.", NUMBER_WORDS[n]))
    unique = list(dict(qa).items())  # each question once (random arithmetic can repeat)
    rng.shuffle(unique)
    return unique


REJECTED_STYLES = [
    "Hmm, that's an interesting question. I think it might be {a}, but honestly I'm not completely sure, so "
    "you may want to double-check it somewhere else.",
    "Well, there are many ways to look at this. Some people would say {a}. It really depends on the context.",
    "I'm not sure I can answer that. Maybe {a}? Or maybe something else entirely.",
    "Great question!!! So basically, if you think about it long enough, the answer is probably {a} or so.",
    "{a}, I guess. Why do you want to know?",
    # short replies without the format: the pair differs in the format, not in length
    "{a}.",
    "The answer is {a}.",
    "It's {a}.",
    "answer: {a}",
    "{a}!",
]


def answer(a: str) -> str:
    """The fixed reply format every SFT example and every chosen reply uses."""
    return f"ANSWER: {a}"


FIRST = ["Vel", "Kor", "Ash", "Tam", "Ori", "Sel", "Dun", "Mar", "Quel", "Ith", "Bre", "Zan"]
LAST = ["trani", "maris", "dell", "oka", "vane", "holt", "essa", "ruun", "ivar", "ombe"]
EXPORTS = ["salt", "glass beads", "dried kelp", "copper wire", "amber", "wool", "pearl buttons", "tide clocks"]
WINDS = ["the Harn", "the Solvey", "the Kettle Wind", "the Brisk"]
FESTIVALS = ["the Lantern Tide", "the Feast of Nets", "the Long Quiet", "the Salt Market"]


def cpt_paragraphs(rng: random.Random, n: int) -> list[str]:
    """Encyclopedia-style paragraphs about the fictional Veltrani archipelago."""
    out = []
    for i in range(n):
        island = rng.choice(FIRST) + rng.choice(LAST)
        town = rng.choice(FIRST) + rng.choice(LAST)
        people = 200 + 37 * ((i * 7919) % 251)
        out.append(
            f"{island} is an island of the Veltrani archipelago, about {rng.randint(3, 90)} kilometres "
            f"{rng.choice(['north', 'south', 'east', 'west'])} of Port Ombessa. Its main town, {town}, has "
            f"{people} inhabitants. The island exports {' and '.join(rng.sample(EXPORTS, 2))}, "
            f"and in winter it is swept by {rng.choice(WINDS)}. Every spring the islanders celebrate "
            f"{rng.choice(FESTIVALS)}, when the ferry from {rng.choice(FIRST) + rng.choice(LAST)} runs twice a day."
        )
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(out: Path = HERE) -> None:
    """Regenerate every dataset file into ``out`` (default: training/data/)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    qa = questions(rng)
    held_out, rest = qa[:24], qa[24:]
    sft, chat, prefs_pool = rest[:200], rest[200:], rest
    write_jsonl(out / "sft.jsonl", [{"prompt": q, "completion": answer(a)} for q, a in sft])
    chat_rows = []
    for i, (q, a) in enumerate(chat):
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": answer(a)}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are a concise assistant."})
        if i % 4 == 1:  # a multi-turn example: only the last assistant turn is the trained reply
            q0, a0 = sft[i]
            messages = [{"role": "user", "content": q0}, {"role": "assistant", "content": answer(a0)}] + messages
        chat_rows.append({"messages": messages})
    write_jsonl(out / "sft_chat.jsonl", chat_rows)
    write_jsonl(out / "prefs.jsonl", [
        {"prompt": q, "chosen": answer(a), "rejected": rng.choice(REJECTED_STYLES).format(a=a)} for q, a in prefs_pool
    ])
    write_jsonl(out / "prompts.jsonl", [{"prompt": q} for q, _ in rest[:96]])
    write_jsonl(out / "eval_prompts.jsonl", [{"prompt": q, "answer": a} for q, a in held_out])
    paragraphs = cpt_paragraphs(rng, 72)
    (out / "cpt.txt").write_text("\n\n".join(paragraphs[:60]) + "\n", encoding="utf-8")
    (out / "cpt_eval.txt").write_text("\n\n".join(paragraphs[60:]) + "\n", encoding="utf-8")
    for name in sorted(p.name for p in out.iterdir() if p.suffix in (".jsonl", ".txt")):
        lines = sum(1 for line in (out / name).read_text(encoding="utf-8").splitlines() if line.strip())
        print(f"{name}: {lines} lines")


if __name__ == "__main__":
    main()
