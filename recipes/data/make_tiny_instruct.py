"""Regenerate ``recipes/data/tiny_instruct/{train,validation}.jsonl`` (deterministic, seeded).

The data set is written for hf-lora's offline demo: short prompt/response pairs from six
rule-based tasks a tiny model can visibly learn in a minute on a CPU (string reversal,
capitals, letter counting, small additions, unit conversion, world capitals). Every answer is
exact, so the evaluation can score exact match as well as perplexity.

    python recipes/data/make_tiny_instruct.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "apple bread chair dance eagle flame grape house index jelly kite lemon money night ocean piano queen river "
    "stone table uncle voice water xenon yacht zebra amber brick cloud delta ember frost globe honey ivory jolly "
    "karma lunar maple noble olive pearl quiet radar salt tiger ultra vivid whale young zesty atlas bloom coral "
    "dream earth fable giant hazel input joker kayak laser mango nerve orbit plant quilt robin solar torch unity "
    "vapor wheat yield zonal blue cat dog egg fig hat ink jam key log map net owl pen rug sun toy van web box yak"
).split()
CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Cuba": "Havana",
    "Chile": "Santiago", "Greece": "Athens", "Poland": "Warsaw", "Ireland": "Dublin", "Austria": "Vienna",
    "Canada": "Ottawa", "Mexico": "Mexico City", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow",
    "Portugal": "Lisbon", "Sweden": "Stockholm", "Finland": "Helsinki", "Turkey": "Ankara", "Iran": "Tehran",
}
UNITS = (("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60))


def _examples(rng: random.Random) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for word in WORDS:
        rows.append({"task": "reverse", "prompt": f"Reverse the word: {word}", "response": word[::-1]})
        rows.append({"task": "upper", "prompt": f"Write in capitals: {word}", "response": word.upper()})
        rows.append({"task": "count", "prompt": f"How many letters are in {word}?", "response": str(len(word))})
    for _ in range(120):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append({"task": "add", "prompt": f"What is {a} + {b}?", "response": str(a + b)})
    for _ in range(60):
        src, dst, factor = rng.choice(UNITS)
        n = rng.randint(1, 9)
        rows.append({"task": "convert", "prompt": f"Convert {n} {src} to {dst}.", "response": f"{n * factor} {dst}"})
    for country, city in CAPITALS.items():
        # Twice each, phrased two ways: facts need repetition to be learned at all.
        rows.append({"task": "capital", "prompt": f"What is the capital of {country}?", "response": city})
        rows.append({"task": "capital", "prompt": f"Name the capital city of {country}.", "response": city})
    return rows


def main() -> None:
    rng = random.Random(1234)
    rows = _examples(rng)
    rng.shuffle(rows)
    held_out = 64
    out = Path(__file__).parent / "tiny_instruct"
    out.mkdir(exist_ok=True)
    for name, part in (("validation", rows[:held_out]), ("train", rows[held_out:])):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for row in part:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(part)} rows")


if __name__ == "__main__":
    main()
