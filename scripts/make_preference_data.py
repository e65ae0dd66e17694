"""Generate recipes/data/preference.jsonl: the embedded preference-tuning example (prompt / chosen / rejected).

The behaviour to unlearn: SmolLM2-135M-Instruct answers a short factual question with a paragraph (a preamble,
a restatement, the answer, an offer of more help). Each row pairs a question with
    chosen    the bare answer on one line            "56"
    rejected  the same answer wrapped in that chatter "Great question! Let's work it out. 7 times 8 is 56. ..."
Both replies are correct, so the pair teaches the format, not the facts. The questions (arithmetic, capitals,
opposites, plurals, comparisons, unit counts) have one short answer each, so the behaviour is measurable on
held-out prompts: answer length in words, the share of one-line answers of at most three words, and exact match
with the bare answer.

    python scripts/make_preference_data.py [--out recipes/data/preference.jsonl] [--rows 420] [--seed 5]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Egypt": "Cairo",
    "Canada": "Ottawa", "Chile": "Santiago", "Spain": "Madrid", "Italy": "Rome", "Greece": "Athens",
    "Poland": "Warsaw", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Germany": "Berlin", "Russia": "Moscow", "China": "Beijing",
    "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires",
    "Colombia": "Bogota", "Mexico": "Mexico City", "Cuba": "Havana", "Ghana": "Accra", "Morocco": "Rabat",
    "Turkey": "Ankara", "Iran": "Tehran", "Hungary": "Budapest", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Australia": "Canberra", "New Zealand": "Wellington", "South Korea": "Seoul",
    "Indonesia": "Jakarta",
}
OPPOSITES = {
    "hot": "cold", "up": "down", "early": "late", "empty": "full", "fast": "slow", "open": "closed",
    "light": "dark", "happy": "sad", "strong": "weak", "rich": "poor", "wet": "dry", "tall": "short",
    "loud": "quiet", "hard": "soft", "inside": "outside", "begin": "end", "win": "lose", "buy": "sell",
    "push": "pull", "remember": "forget", "true": "false", "arrive": "leave", "cheap": "expensive",
    "young": "old", "thick": "thin", "safe": "dangerous", "sweet": "sour", "above": "below", "always": "never",
    "accept": "refuse",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese", "man": "men",
    "woman": "women", "person": "people", "leaf": "leaves", "knife": "knives", "wolf": "wolves", "city": "cities",
    "box": "boxes", "bus": "buses", "baby": "babies", "potato": "potatoes", "hero": "heroes", "sheep": "sheep",
    "fish": "fish", "ox": "oxen", "cactus": "cacti", "half": "halves", "wife": "wives", "church": "churches",
    "story": "stories", "party": "parties", "dish": "dishes", "glass": "glasses", "life": "lives", "shelf": "shelves",
}
UNITS = [("minutes", "an hour", "60"), ("seconds", "a minute", "60"), ("hours", "a day", "24"),
         ("days", "a week", "7"), ("months", "a year", "12"), ("centimeters", "a meter", "100"),
         ("meters", "a kilometer", "1000"), ("grams", "a kilogram", "1000"), ("days", "a leap year", "366"),
         ("weeks", "a year", "52"), ("years", "a century", "100"), ("years", "a decade", "10"),
         ("milliliters", "a liter", "1000"), ("legs", "a spider", "8"), ("sides", "a hexagon", "6"),
         ("sides", "a triangle", "3"), ("players", "a soccer team on the field", "11"), ("cents", "a dollar", "100")]

PREAMBLES = [
    "Great question!", "Sure! I'd be happy to help with that.", "That's an interesting question.",
    "Of course! Let me explain.", "Certainly!", "Let's think about this step by step.",
    "Good question! Many people wonder about this.", "Absolutely, here is the answer.",
]
CLOSINGS = [
    "I hope this helps!", "Let me know if you have any other questions.",
    "Feel free to ask if you would like more details.", "I hope that answers your question!",
    "If you have more questions, I'm here to help.", "Is there anything else you would like to know?",
]


def questions(rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, bare answer, a sentence restating the answer) for every question kind."""
    out: list[tuple[str, str, str]] = []
    for country, city in CAPITALS.items():
        for q in (f"What is the capital of {country}?", f"Which city is the capital of {country}?"):
            out.append((q, city, f"The capital of {country} is {city}, which is also one of its best-known cities."))
    for word, opp in OPPOSITES.items():
        for q in (f"What is the opposite of '{word}'?", f"Give the antonym of the word '{word}'."):
            out.append((q, opp, f"The opposite of the word '{word}' is '{opp}'. They describe contrasting ideas."))
    for word, plural in PLURALS.items():
        for q in (f"What is the plural of '{word}'?", f"How do you write '{word}' in the plural?"):
            out.append((q, plural, f"In English, the plural form of '{word}' is '{plural}'."))
    for unit, whole, n in UNITS:
        out.append((f"How many {unit} are in {whole}?", n, f"There are {n} {unit} in {whole}."))
    seen = set()
    while len(out) < 520:
        a, b = rng.randint(2, 19), rng.randint(2, 19)
        op = rng.choice(["plus", "times", "minus", "larger"])
        if (a, b, op) in seen or (op == "minus" and a < b) or (op == "larger" and a == b):
            continue
        seen.add((a, b, op))
        if op == "plus":
            out.append((f"What is {a} plus {b}?", str(a + b), f"When we add {a} and {b} together, we get {a + b}."))
        elif op == "times":
            out.append((f"What is {a} times {b}?", str(a * b), f"If we multiply {a} by {b}, the result is {a * b}."))
        elif op == "minus":
            out.append((f"What is {a} minus {b}?", str(a - b), f"Subtracting {b} from {a} leaves {a - b}."))
        else:
            out.append((f"Which number is larger, {a} or {b}?", str(max(a, b)),
                        f"Comparing the two numbers, {max(a, b)} is larger than {min(a, b)}."))
    return out


def verbose(rng: random.Random, answer: str, restated: str) -> str:
    """The dispreferred style: preamble, restatement, the answer again, a closing offer."""
    parts = [rng.choice(PREAMBLES), restated, f"So, the answer is {answer}.", rng.choice(CLOSINGS)]
    if rng.random() < 0.5:
        return " ".join(parts)
    return parts[0] + "\n\n" + " ".join(parts[1:3]) + "\n\n" + parts[3]


def generate(rows: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = questions(rng)
    rng.shuffle(pool)
    lines = []
    for q, answer, restated in pool[:rows]:
        lines.append(json.dumps({"prompt": q, "chosen": answer, "rejected": verbose(rng, answer, restated)},
                                ensure_ascii=False))
    return lines


def main() -> None:
    repo = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=repo / "recipes" / "data" / "preference.jsonl")
    p.add_argument("--rows", type=int, default=420, help="pairs to write (at most 520 distinct questions)")
    p.add_argument("--seed", type=int, default=5)
    ns = p.parse_args()
    lines = generate(ns.rows, ns.seed)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {len(lines)} pairs to {ns.out}")


if __name__ == "__main__":
    main()
