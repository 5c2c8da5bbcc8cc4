"""Write the demo model's detection pairs, from the training generators of train_demo.py.

    python scripts/make_demo_pairs.py

steer_gguf/data/pairs/demo-numbers.jsonl     behavior 1: digits, behavior 2: number words
steer_gguf/data/pairs/demo-restricted.jsonl  behavior 1: refusal, behavior 2: compliance
Prompts come from the training distribution; the demo's held-out prompts
(steer_gguf/data/demo_prompts.json) are excluded, so its measured rates are on unseen prompts.
"""
from __future__ import annotations

import json
import pathlib
import random
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_demo  # noqa: E402

OUT = HERE.parent / "steer_gguf" / "data" / "pairs"
N_PAIRS = 150


def main() -> None:
    train, heldout = train_demo.make_data()
    held = set(heldout["numbers"]) | set(heldout["restricted"])
    rng = random.Random(7)
    for kind, name in (("numbers", "demo-numbers"), ("restricted", "demo-restricted")):
        items = [t for t in train if t["kind"] == kind and t["prompt"] not in held]
        rng.shuffle(items)
        seen, lines = set(), []
        for it in items:
            if it["prompt"] in seen:
                continue
            seen.add(it["prompt"])
            r = dict(it["responses"])
            s1, s2 = ("digits", "words") if kind == "numbers" else ("refuse", "comply")
            lines.append(json.dumps({"prompt": it["prompt"], "response_0": r[s1], "response_1": r[s2]}))
            if len(lines) == N_PAIRS:
                break
        (OUT / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"{name}: {len(lines)} pairs")


if __name__ == "__main__":
    main()
