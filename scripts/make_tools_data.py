"""Generate recipes/data/tools.jsonl: the embedded tool-calling example (OpenAI tools / tool_calls rows).

The skill: given two tools, answer a request with the right call and exactly the right arguments,
    get_weather       {"city": "Lisbon", "unit": "fahrenheit"}        unit: celsius unless the user asks otherwise
    convert_currency  {"amount": 25, "from_currency": "EUR", "to_currency": "JPY"}   currency names -> ISO codes
The call is fully determined by the request (the city, the amount, the currencies named in words or codes), so
function-call exact match (name + JSON-equal arguments) is a fair score. Every row carries the two tool
definitions in OpenAI's shape; the chat template (recipes/templates/qwen2.5-tools.jinja) renders them into the
system turn and the call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. SmolLM2-135M-Instruct has
never seen this format and does not produce these calls before training.

    python scripts/make_tools_data.py [--out recipes/data/tools.jsonl] [--rows 300] [--seed 11]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "You are a helpful assistant. Call a tool when it can answer."
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert money between currencies (ISO codes).",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"},
            "from_currency": {"type": "string"},
            "to_currency": {"type": "string"}},
            "required": ["amount", "from_currency", "to_currency"]}}},
]
CITIES = [
    "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Denver", "Cairo", "Dublin", "Seoul", "Perth", "Quito", "Tunis",
    "Riga", "Austin", "Porto", "Kyoto", "Bogota", "Accra", "Vienna", "Manila", "Zagreb", "Muscat", "Boston", "Lyon",
    "Havana", "Dakar", "Krakow", "Sapporo", "Calgary", "Malaga", "Tbilisi", "Chennai", "Geneva", "Tallinn",
    "Auckland", "Phoenix", "Bergen", "Santiago", "Valencia", "Windhoek",
]
WEATHER = [
    "What's the weather in {city}{unit}?", "How warm is it in {city} right now{unit}?",
    "weather {city}{unit}", "Is it cold in {city} today{unit}?", "Tell me the current weather for {city}{unit}.",
    "I'm flying to {city} tonight. What's the weather there{unit}?", "Current temperature in {city}{unit}, please.",
    "Do I need a coat in {city}{unit}?",
]
UNITS = {"celsius": ["", " in celsius", " in degrees C"], "fahrenheit": [" in fahrenheit", " in degrees F",
                                                                          " (fahrenheit please)"]}
CURRENCIES = {"EUR": ["euros", "EUR"], "USD": ["US dollars", "USD", "dollars"], "JPY": ["yen", "JPY"],
              "GBP": ["pounds", "GBP"], "CHF": ["Swiss francs", "CHF"], "INR": ["rupees", "INR"],
              "CAD": ["Canadian dollars", "CAD"]}
CONVERT = [
    "How much is {amount} {src} in {dst}?", "Convert {amount} {src} to {dst}.", "{amount} {src} to {dst}",
    "What do {amount} {src} come to in {dst}?", "I have {amount} {src}. How many {dst} is that?",
    "Please change {amount} {src} into {dst}.",
]


def weather(rng: random.Random) -> tuple[str, dict]:
    city, unit = rng.choice(CITIES), rng.choice(sorted(UNITS))
    text = rng.choice(WEATHER).format(city=city, unit=rng.choice(UNITS[unit]))
    return text, {"name": "get_weather", "arguments": {"city": city, "unit": unit}}


def convert(rng: random.Random) -> tuple[str, dict]:
    src, dst = rng.sample(sorted(CURRENCIES), 2)
    amount: float | int = rng.choice([rng.randint(2, 900), round(rng.uniform(1, 500), 2)])
    text = rng.choice(CONVERT).format(amount=amount, src=rng.choice(CURRENCIES[src]), dst=rng.choice(CURRENCIES[dst]))
    return text, {"name": "convert_currency", "arguments": {"amount": amount, "from_currency": src,
                                                             "to_currency": dst}}


def conversation(user: str, call: dict, k: int) -> dict:
    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": f"call_{k}", "type": "function", "function": call}]}]}


def generate(rows: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    seen: set[str] = set()
    lines = []
    while len(lines) < rows:
        user, call = (weather if rng.random() < 0.5 else convert)(rng)
        if user in seen:  # every request once: no duplicate across the splits
            continue
        seen.add(user)
        lines.append(json.dumps(conversation(user, call, len(lines)), ensure_ascii=False))
    return lines


def main() -> None:
    repo = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=repo / "recipes" / "data" / "tools.jsonl")
    p.add_argument("--rows", type=int, default=300, help="unique requests, half weather and half currency")
    p.add_argument("--seed", type=int, default=11)
    ns = p.parse_args()
    lines = generate(ns.rows, ns.seed)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {len(lines)} lines to {ns.out}")


if __name__ == "__main__":
    main()
