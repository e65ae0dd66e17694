"""Generate recipes/data/quickstart.jsonl: the embedded quickstart task, with planted defects.

The skill: read a short customer-support ticket and answer with one exact JSON line
    {"order":"48213","item":"desk lamp","issue":"broken","name":"Dana"}
The order number, item and customer name are copied from the ticket; the issue is one of four labels
(broken, wrong_item, missing_part, not_delivered) that the ticket describes in varied words. The answer is
fully determined by the ticket, so exact match is a fair score. SmolLM2-135M-Instruct does not know the
keys, the labels or the compact format (about 0% exact match before training) and learns them in a few
CPU minutes of LoRA.

Defects planted for the cleaning report (same seed, same file, byte for byte): exact duplicates, near
duplicates (case/punctuation changes), an empty assistant reply, a blank user turn, a
conversation that ends with the user, an unknown role, a row without "messages", a malformed JSON line,
and messy whitespace/Unicode that normalisation fixes.

    python scripts/make_quickstart_data.py [--out recipes/data/quickstart.jsonl] [--rows 560] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "Summarize the ticket as JSON."

ITEMS = [
    "desk lamp", "coffee grinder", "phone case", "yoga mat", "water bottle", "gaming mouse", "rain jacket",
    "travel mug", "bike light", "wall clock", "laptop stand", "hair dryer", "table fan", "camping stove",
    "book light", "bath towel", "tea kettle", "door mat", "photo frame", "shoe rack", "rice cooker",
    "night light", "sun hat", "flower pot", "usb hub", "wool scarf", "cutting board", "pepper mill",
    "alarm clock", "dog leash", "baby monitor", "ski gloves", "phone charger", "kitchen scale", "bread knife",
    "garden hose", "office chair", "tool box", "pizza stone", "snow boots",
]
NAMES = [
    "Dana", "Omar", "Lena", "Raj", "Mia", "Tom", "Ines", "Kofi", "Sara", "Yuki", "Ben", "Aisha", "Luca", "Nora",
    "Ivan", "Zoe", "Pedro", "Hana", "Eli", "Maya", "Finn", "Rosa", "Arjun", "Chloe", "Malik", "Greta", "Leo",
    "Priya", "Sven", "Amara", "Jonas", "Lily", "Kenji", "Ruth", "Diego", "Elsa", "Noah", "Fatima", "Oscar",
    "Julia", "Tariq", "Vera", "Hugo", "Mei", "Paul", "Anya", "Sam", "Isla", "Karim", "Emma",
]
ISSUES = {
    "broken": ["arrived broken", "came cracked", "was smashed in the box", "stopped working after a day",
               "does not turn on", "arrived with a dent"],
    "wrong_item": ["is not what I ordered", "is the wrong model", "came in the wrong color",
                   "turned out to be a different product", "is the wrong size"],
    "missing_part": ["came without the cable", "is missing a part", "arrived without the screws",
                     "had no manual or charger", "came with pieces missing"],
    "not_delivered": ["never arrived", "still has not shown up", "says delivered but is not here",
                      "has been stuck in transit for weeks", "was lost by the courier"],
}
GREETINGS = ["Hi,", "Hello,", "Hey,", "Good morning,", "Dear support,", ""]
SIGNOFFS = ["Thanks, {n}", "- {n}", "Regards, {n}", "Best, {n}", "{n}", "Cheers, {n}"]
# How the order number and item appear in the ticket.
LEADS = [
    "my {item} (order #{o}) {issue}.",
    "order {o}: the {item} {issue}.",
    "the {item} from order no. {o} {issue}.",
    "I bought a {item}, order {o}, and it {issue}.",
    "re order #{o} - my {item} {issue}.",
]
ASKS = ["", "Please help.", "What can you do?", "I need this fixed.", "Please advise.", "Not happy."]


def answer(order: str, item: str, issue: str, name: str) -> str:
    return json.dumps({"order": order, "item": item, "issue": issue, "name": name}, separators=(",", ":"))


def ticket(rng: random.Random, seen: set[tuple]) -> tuple[str, str]:
    """One unique ticket and its answer. Two tickets never share all their phrasing (they would be near
    duplicates that differ only in a number and a name)."""
    while True:
        issue = rng.choice(sorted(ISSUES))
        phrase = rng.choice(ISSUES[issue])
        parts = (rng.choice(GREETINGS), rng.choice(LEADS), phrase, rng.choice(ASKS), rng.choice(SIGNOFFS))
        if parts in seen:
            continue
        seen.add(parts)
        greeting, lead, phrase, ask, signoff = parts
        order, item, name = str(rng.randint(10000, 99999)), rng.choice(ITEMS), rng.choice(NAMES)
        body = lead.format(item=item, o=order, issue=phrase)
        body = body[0].upper() + body[1:] if not greeting else body
        text = " ".join(p for p in (greeting, body, ask, signoff.format(n=name)) if p)
        return text, answer(order, item, issue, name)


def conversation(user: str, reply: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                         {"role": "assistant", "content": reply}]}


def generate(rows: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    seen: set[tuple] = set()
    clean = [ticket(rng, seen) for _ in range(rows)]
    lines = [json.dumps(conversation(u, a), ensure_ascii=False) for u, a in clean]

    defects: list[str] = []
    # exact duplicates (a re-export that appended the same rows again)
    defects += [lines[i] for i in rng.sample(range(rows), 10)]
    # near duplicates: the same ticket re-typed in capitals or with other punctuation
    for k, i in enumerate(rng.sample(range(rows), 8)):
        u, a = clean[i]
        variant = u.upper() if k % 2 else u.replace(",", "").replace(".", "!")
        defects.append(json.dumps(conversation(variant, a), ensure_ascii=False))
    # messy whitespace and Unicode (fixed by normalisation, not dropped): non-breaking spaces, double
    # spaces, trailing blanks, a full-width digit
    for i in rng.sample(range(rows), 12):
        u, a = clean[i]
        lines[i] = json.dumps(conversation("  " + u.replace(" ", "  ", 2).replace(",", ",\u00a0", 1) + " \t", a),
                              ensure_ascii=False)
    u, a = ticket(rng, seen)
    defects.append(json.dumps(conversation(u, ""), ensure_ascii=False))               # empty reply
    u, a = ticket(rng, seen)
    defects.append(json.dumps(conversation("   ", a), ensure_ascii=False))            # blank ticket
    u, a = ticket(rng, seen)
    defects.append(json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": u}]}))         # no reply at all
    u, a = ticket(rng, seen)
    defects.append(json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a},
                                            {"role": "user", "content": "Any update?"}]}))  # ends with the user
    u, a = ticket(rng, seen)
    defects.append(json.dumps({"messages": [{"role": "user", "content": u},
                                            {"role": "agent", "content": a}]}))          # unknown role
    u, a = ticket(rng, seen)
    defects.append(json.dumps({"conversation": [{"role": "user", "content": u},
                                                {"role": "assistant", "content": a}]}))  # wrong key
    u, a = ticket(rng, seen)
    defects.append(json.dumps(conversation(u, a))[:-7])                                   # truncated line
    for d in defects:  # scatter the defects through the file, deterministically
        lines.insert(rng.randrange(len(lines) + 1), d)
    return lines


def main() -> None:
    repo = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=repo / "recipes" / "data" / "quickstart.jsonl")
    p.add_argument("--rows", type=int, default=500, help="clean, unique tickets before the planted defects")
    p.add_argument("--seed", type=int, default=7)
    ns = p.parse_args()
    lines = generate(ns.rows, ns.seed)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {len(lines)} lines to {ns.out}")


if __name__ == "__main__":
    main()
