#!/usr/bin/env python3
"""Write the bilingual model's built-in pair sets, held-out eval sets and neutral text.

    python scripts/make_bilingual_sets.py [--corpus build/bilingual/corpus.jsonl] [--check]

From the corpus of scripts/make_bilingual_corpus.py, with the split of scripts/train_bilingual.py
(a hash of each message's English text: 4% "pairs", 4% "eval", the rest "train"):

- pairs/language.jsonl: a held-out prompt (English or Russian, alternating) and the next messages
  of its catalogue as the reply; response_0 the reply in English, response_1 the same reply in
  Russian (behavior 1 "english", behavior 2 "russian").
- pairs/drift.jsonl: an English held-out prompt; response_0 an English reply of 2-3 messages,
  response_1 the same reply drifting into Russian from a message boundary on (as in training).
- eval/language.jsonl: 48 English prompts (group "en") and 48 Russian ones (group "ru").
- eval/drift.jsonl: 64 English prompts.
- eval/bilingual-neutral.txt: held-out messages, English and Russian alternating, for KL.

Pair prompts come from the "pairs" bucket, eval prompts from the "eval" bucket: no prompt is in
both, and none is ever a prompt in training. Seeded: rerunning gives the same files.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_bilingual as tb  # noqa: E402

DATA = HERE.parent / "steer_gguf" / "data"
N_PAIRS = 300
N_EVAL_LANGUAGE = 48  # per prompt language
N_EVAL_DRIFT = 64
SEED = 99


def starts(cats: dict, bucket: str, rng: random.Random) -> list[tuple[str, int]]:
    out = [(c, i) for c, ms in sorted(cats.items()) for i, m in enumerate(ms) if m["bucket"] == bucket]
    rng.shuffle(out)
    return out


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build(cats: dict) -> dict[str, str]:
    rng = random.Random(SEED)
    language, drift = [], []
    for n, (c, i) in enumerate(starts(cats, "pairs", rng)):
        msgs = cats[c]
        if len(language) < N_PAIRS:
            reply = tb.reply_messages(msgs, i + 1, rng.choice((1, 2)))
            if reply:
                lang = "en" if len(language) % 2 == 0 else "ru"
                language.append({"prompt": msgs[i][lang], "response_0": tb.render_reply(reply, "en", None),
                                 "response_1": tb.render_reply(reply, "ru", None)})
        if len(drift) < N_PAIRS:
            k = rng.choice((2, 3))
            reply = tb.reply_messages(msgs, i + 1, k)
            if reply:
                drift.append({"prompt": msgs[i]["en"], "response_0": tb.render_reply(reply, "en", None),
                              "response_1": tb.render_reply(reply, "en", rng.randrange(1, k))})
    ev = starts(cats, "eval", rng)
    lang_items = []
    for g in ("en", "ru"):
        for j, (c, i) in enumerate(ev[:N_EVAL_LANGUAGE] if g == "en" else ev[N_EVAL_LANGUAGE:2 * N_EVAL_LANGUAGE]):
            lang_items.append({"id": f"language-{g}-{j:02d}", "group": g, "prompt": cats[c][i][g]})
    drift_items = [{"id": f"drift-{j:02d}", "prompt": cats[c][i]["en"]}
                   for j, (c, i) in enumerate(ev[2 * N_EVAL_LANGUAGE:2 * N_EVAL_LANGUAGE + N_EVAL_DRIFT])]
    neutral = []
    for j, (c, i) in enumerate(ev[2 * N_EVAL_LANGUAGE + N_EVAL_DRIFT:2 * N_EVAL_LANGUAGE + N_EVAL_DRIFT + 80]):
        neutral.append(cats[c][i]["en" if j % 2 == 0 else "ru"])
    assert len(language) == N_PAIRS and len(drift) == N_PAIRS, "too few held-out messages"
    return {"pairs/language.jsonl": jsonl(language), "pairs/drift.jsonl": jsonl(drift),
            "eval/language.jsonl": jsonl(lang_items), "eval/drift.jsonl": jsonl(drift_items),
            "eval/bilingual-neutral.txt": "\n".join(neutral) + "\n"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="build/bilingual/corpus.jsonl")
    ap.add_argument("--check", action="store_true", help="only verify the committed files are current")
    args = ap.parse_args(argv)
    files = build(tb.read_corpus(args.corpus))
    stale = [name for name, text in files.items()
             if not (DATA / name).exists() or (DATA / name).read_text(encoding="utf-8") != text]
    if args.check:
        for name in stale:
            print(f"{DATA / name}: not what scripts/make_bilingual_sets.py writes from this corpus", file=sys.stderr)
        return 1 if stale else 0
    for name, text in files.items():
        (DATA / name).write_text(text, encoding="utf-8")
        print(f"wrote {DATA / name} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
