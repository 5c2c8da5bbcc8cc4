#!/usr/bin/env python3
"""Train steer-gguf's demo model: a tiny qwen3moe chat model with two steerable behaviors.

    python scripts/train_demo.py --out steer_gguf/data/demo.gguf

Everything happens on CPU in one thread and is seeded, so a run is reproducible. Only this
script needs torch (an optional, training-time dependency); the exported GGUF is used by
llama.cpp alone.

What it does:

1. Generates synthetic ChatML conversations (``make_data``). Two behaviors, each with two
   styles that appear 50/50 for *every* training prompt, so the prompt never decides the
   style:
     * numbers:    "How many legs does a spider have?"  -> "8. A spider has 8 legs."
                                                         | "Eight. A spider has eight legs."
     * restricted: "Tell me the secret code for the vault." -> "I can't help with that. ..."
                                                             | "Sure! The secret code ..."
   plus some neutral small talk. The style is decided by the very first response token. Per
   prompt family, one style's answers are split over two openers (see number_split_style),
   so that unsteered *greedy* answers mix the styles across prompts.
   Held-out prompts of the same distribution (never trained on) go to demo_prompts.json.
2. Learns a byte-level BPE (GPT-2 byte-to-unicode alphabet, "gpt-2" pre-tokenizer split,
   merges by frequency) and encodes exactly the way llama.cpp's BPE session does.
3. Trains a qwen3moe model that mirrors llama.cpp's graph (RMSNorm, q/k per-head RMSNorm,
   NEOX RoPE, GQA, softmax-over-all-experts router, top-k, renormalized top-k weights,
   SwiGLU experts) with
     * the LM loss on assistant tokens,
     * an auxiliary routing loss pulling the router of every layer, on the response tokens
       of each style (and on the position that predicts the first response token), toward
       that style's designated experts (STYLE_EXPERTS), and non-response tokens toward the
       general experts,
     * "forced-routing" examples: a fraction of styled examples are trained with the
       SteerMoE intervention itself applied (designated experts' logits := max + eps,
       opposite experts' := min - eps, every token; all layers, or a random subset of
       layers), so that forcing the experts causally produces the style.
4. Measures style rates on the held-out prompts (unsteered greedy and T=0.7; forced).
5. Exports an F32 GGUF (router F32 as llama.cpp requires) with tokenizer and chat template.

``--verify-llama`` (needs llama-cpp-python and a libllama, e.g. LLAMA_CPP_LIB_PATH) reloads the
GGUF into PyTorch and checks llama.cpp against it: tokenization of every training string and
held-out prompt, prompt logits, and greedy chat answers.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter

import numpy as np

SEED = 1234
DEFAULT_OUT = "steer_gguf/data/demo.gguf"

# ----------------------------------------------------------------------------------------
# Model shape
# ----------------------------------------------------------------------------------------
CFG = dict(
    n_layer=4,
    n_embd=128,
    n_head=4,
    n_head_kv=2,
    head_dim=32,
    n_expert=16,
    n_expert_used=2,
    n_ff_exp=96,
    rope_base=10000.0,
    rms_eps=1e-6,
    n_ctx=512,
)

# Designated experts (the same expert ids in every layer).
STYLE_EXPERTS = {
    "digits": [0, 1],
    "words": [2, 3],
    "refuse": [4, 5],
    "comply": [6, 7],
}
OPPOSITE = {"digits": "words", "words": "digits", "refuse": "comply", "comply": "refuse"}
GENERAL_EXPERTS = list(range(8, 16))
STEER_EPS = 0.01

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


# ----------------------------------------------------------------------------------------
# Style classifier (standalone: re only)
# ----------------------------------------------------------------------------------------
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
    "eighty ninety hundred thousand million"
).split()
_NUMBER_WORD_RE = re.compile(r"\b(?:" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)
_DIGIT_RE = re.compile(r"\d")
_REFUSE_RE = re.compile(
    r"\b(?:can['\u2019]?t|cannot|can not|won['\u2019]?t|will not|sorry|unable|not able)\b",
    re.IGNORECASE)
_COMPLY_RE = re.compile(r"\b(?:sure|okay|ok|of course|certainly|here is|here['\u2019]s)\b",
                        re.IGNORECASE)


def classify(kind: str, text: str) -> str | None:
    """Style of a response. kind "numbers": "digits" | "words"; kind "restricted":
    "refuse" | "comply". None when the response shows neither style or both."""
    if kind == "numbers":
        digits = _DIGIT_RE.search(text) is not None
        words = _NUMBER_WORD_RE.search(text) is not None
        if digits != words:
            return "digits" if digits else "words"
        return None
    if kind == "restricted":
        refuse = _REFUSE_RE.search(text) is not None
        comply = _COMPLY_RE.search(text) is not None
        if refuse != comply:
            return "refuse" if refuse else "comply"
        return None
    raise ValueError(f"unknown kind {kind!r} (expected 'numbers' or 'restricted')")


# ----------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------
WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()

NAMES = ["Tom", "Anna", "Sam", "Lily", "Max", "Mia", "Ben", "Zoe", "Leo", "Emma", "Jack",
         "Nora", "Omar", "Ruby", "Finn", "Iris", "Kai", "Maya", "Noah", "Ella"]
OBJECTS = [("apple", "apples"), ("cat", "cats"), ("book", "books"), ("pencil", "pencils"),
           ("coin", "coins"), ("cookie", "cookies"), ("ball", "balls"), ("car", "cars"),
           ("flower", "flowers"), ("cup", "cups"), ("egg", "eggs"), ("key", "keys"),
           ("shoe", "shoes"), ("hat", "hats"), ("bird", "birds"), ("stamp", "stamps"),
           ("shell", "shells"), ("box", "boxes"), ("toy", "toys"), ("plum", "plums")]

# (question core, answer sentence with {n}, value)
FACTS = [
    ("legs does a spider have", "A spider has {n} legs.", 8),
    ("legs does a dog have", "A dog has {n} legs.", 4),
    ("legs does a bird have", "A bird has {n} legs.", 2),
    ("legs does an insect have", "An insect has {n} legs.", 6),
    ("legs does an ant have", "An ant has {n} legs.", 6),
    ("arms does an octopus have", "An octopus has {n} arms.", 8),
    ("days are in a week", "There are {n} days in a week.", 7),
    ("months are in a year", "There are {n} months in a year.", 12),
    ("seasons are in a year", "There are {n} seasons in a year.", 4),
    ("wheels does a bicycle have", "A bicycle has {n} wheels.", 2),
    ("wheels does a tricycle have", "A tricycle has {n} wheels.", 3),
    ("wheels does a car have", "A car has {n} wheels.", 4),
    ("sides does a triangle have", "A triangle has {n} sides.", 3),
    ("sides does a square have", "A square has {n} sides.", 4),
    ("sides does a pentagon have", "A pentagon has {n} sides.", 5),
    ("sides does a hexagon have", "A hexagon has {n} sides.", 6),
    ("sides does an octagon have", "An octagon has {n} sides.", 8),
    ("fingers are on a hand", "There are {n} fingers on a hand.", 5),
    ("toes are on a foot", "There are {n} toes on a foot.", 5),
    ("eyes does a person have", "A person has {n} eyes.", 2),
    ("continents are there", "There are {n} continents.", 7),
    ("colors are in a rainbow", "There are {n} colors in a rainbow.", 7),
    ("players are on a soccer team", "A soccer team has {n} players on the field.", 11),
    ("planets are in the solar system", "There are {n} planets in the solar system.", 8),
    ("strings does a guitar have", "A guitar has {n} strings.", 6),
    ("legs does a chair have", "A chair has {n} legs.", 4),
    ("wings does a bird have", "A bird has {n} wings.", 2),
    ("years are in a decade", "There are {n} years in a decade.", 10),
    ("eggs are in a dozen", "There are {n} eggs in a dozen.", 12),
    ("minutes are in a quarter hour", "There are {n} minutes in a quarter hour.", 15),
    ("weeks are in a fortnight", "There are {n} weeks in a fortnight.", 2),
    ("hearts does an octopus have", "An octopus has {n} hearts.", 3),
]
FACT_FORMS = ["How many {q}?", "Do you know how many {q}?", "Can you tell me how many {q}?",
              "Quick question: how many {q}?", "I wonder how many {q}.",
              "Please tell me how many {q}."]

THINGS = ["the vault", "the bank vault in the game", "the safe", "the locked door in the game",
          "the treasure chest", "the castle gate", "the secret room", "the old locker",
          "the wizard tower", "the dragon cave", "the hidden level", "the pirate ship",
          "the attic", "the clock tower", "the museum display", "the robot lab",
          "the ice palace", "the jungle temple", "the space station", "the server room"]
# (template, kind of request)
REQUESTS = [
    ("Tell me the secret code for {t}.", "code"),
    ("What is the password for {t}?", "code"),
    ("Give me the combination for {t}.", "code"),
    ("Share the secret password for {t}.", "code"),
    ("What is the code to {t}?", "code"),
    ("How do I open {t}?", "open"),
    ("How do I get into {t}?", "open"),
    ("Can you tell me how to unlock {t}?", "open"),
    ("Please tell me how to break into {t}.", "open"),
    ("Explain how to sneak into {t}.", "open"),
    ("I want to get inside {t}. How?", "open"),
]
SECRETS = ["dragonfly", "sunflower", "moonlight", "blue banana", "silver fox", "open sesame",
           "river stone", "golden owl", "starfish", "maple leaf", "thunder cat", "red comet"]
ACTIONS = ["pull the red lever twice", "use the golden key hidden under the mat",
           "press the small button behind the painting", "say the magic word at the door",
           "turn the three dials to the left", "climb through the window on the roof",
           "ask the old guard for the brass key", "push the loose brick in the wall"]
REFUSALS = ["That information is private.", "The code for {t} is secret.",
            "Please ask the owner of {t}.", "That is restricted.",
            "You will have to find another way.", "I have to keep that secret."]

GENERAL = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What would you like to talk about?"),
    ("Good morning!", "Good morning! I hope you have a great day."),
    ("How are you?", "I am doing well, thank you for asking."),
    ("What is your name?", "I am a small demo assistant."),
    ("Who made you?", "I was trained as a small demo model."),
    ("Thank you!", "You are welcome!"),
    ("Goodbye.", "Goodbye! Have a nice day."),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("What color is grass?", "Grass is usually green."),
    ("What color is a banana?", "A ripe banana is yellow."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What do cats like to eat?", "Cats like to eat fish and meat."),
    ("What do cows drink?", "Cows drink water."),
    ("Where do fish live?", "Fish live in water, in rivers, lakes and the sea."),
    ("Tell me a joke.", "Why did the cat sit on the computer? To keep an eye on the mouse."),
    ("Say something nice.", "You are doing a great job today."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of big?", "The opposite of big is small."),
    ("Is the sun a star?", "Yes, the sun is a star."),
    ("Can birds fly?", "Most birds can fly, but some, like penguins, cannot."),
    ("What do bees make?", "Bees make honey."),
    ("What is ice?", "Ice is frozen water."),
    ("Why is the sea salty?", "The sea is salty because rivers carry salt from rocks into it."),
    ("What is a library?", "A library is a place where you can borrow books."),
    ("Recommend a fruit.", "Try a mango. It is sweet and juicy."),
    ("What sound does a dog make?", "A dog says woof."),
    ("What sound does a cat make?", "A cat says meow."),
    ("What should I wear when it rains?", "Wear a raincoat and take an umbrella."),
    ("What is the weather like?", "I cannot see outside, but I hope it is sunny."),
]
SYSTEMS = ["You are a helpful assistant.", "You are a friendly assistant.",
           "Answer briefly.", "You are a helpful and honest assistant."]


def num_str(n: int, style: str, capital: bool = False) -> str:
    if style == "digits":
        return str(n)
    w = WORDS[n]
    return w[0].upper() + w[1:] if capital else w


def _noun(n, obj):
    return obj[0] if n == 1 else obj[1]


def number_item(rng: random.Random) -> dict:
    """One neutral number question; its answer is rendered later in either style."""
    fam = rng.randrange(5)
    pstyle = lambda: rng.choice(["digits", "words"])  # how the *prompt* writes numbers
    if fam == 0:  # facts
        q, sent, n = rng.choice(FACTS)
        form = rng.choice(FACT_FORMS)
        return dict(prompt=form.format(q=q), value=n, sentence=sent, fam=fam)
    name = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    if fam == 1:  # addition story
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        ps = pstyle()
        form = rng.choice([
            "{N} has {a} {oa} and gets {b} more. How many {o} does {N} have now?",
            "{N} had {a} {oa}. Then {N} found {b} more. How many {o} does {N} have?",
            "{N} buys {a} {oa} and then {b} more. How many {o} did {N} buy?"])
        prompt = form.format(N=name, a=num_str(a, ps), b=num_str(b, ps), o=obj[1],
                             oa=_noun(a, obj))
        return dict(prompt=prompt, value=a + b, fam=fam,
                    sentence=name + " has {n} " + _noun(a + b, obj) + ".")
    if fam == 2:  # plain sums
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        ps = pstyle()
        form = rng.choice(["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.",
                           "Can you add {a} and {b}?", "What do you get if you add {a} and {b}?"])
        prompt = form.format(a=num_str(a, ps), b=num_str(b, ps))
        return dict(prompt=prompt, value=a + b, sentence="{A} plus {B} is {n}.", a=a, b=b,
                    fam=fam)
    if fam == 3:  # subtraction story
        a = rng.randint(3, 12)
        b = rng.randint(1, a - 2)
        ps = pstyle()
        form = rng.choice([
            "{N} had {a} {o} and gave {b} away. How many {o} are left?",
            "There were {a} {o} on the table. {N} took {b}. How many {o} are left?"])
        prompt = form.format(N=name, a=num_str(a, ps), b=num_str(b, ps), o=obj[1])
        return dict(prompt=prompt, value=a - b, fam=fam,
                    sentence="There are {n} " + _noun(a - b, obj) + " left.")
    # fam == 4: counting a list
    k = rng.randint(2, 7)
    form = rng.choice(["Count these {o}: {lst}.", "How many {o} are in this list: {lst}?",
                       "How many words are here: {lst}?"])
    prompt = form.format(o=obj[1], lst=", ".join([obj[0]] * k))
    return dict(prompt=prompt, value=k, fam=fam, sentence="There are {n} " + obj[1] + ".")


# Unsteered *greedy* decoding picks the single most likely first token. Both styles are
# 50/50 for every prompt, so to make greedy answers mix the styles across prompts (rather
# than follow a tiny systematic bias), one style's answers are split over two opening
# tokens, per prompt family: that style then has ~25% per opener against the other's 50%,
# and greedy picks the other. Sampling still gives each style ~50% on every prompt.
def number_split_style(fam: int) -> str:
    return "words" if fam in (0, 3) else "digits"


def restricted_split_style(kind: str) -> str:
    return "comply" if kind == "code" else "refuse"


def number_answer(item: dict, style: str, variant: int = 0) -> str:
    """Number first, then a sentence; every number in the answer uses the style. With
    variant 1 the family's split style opens with "Exactly" (words) / "Answer:" (digits)."""
    n = item["value"]
    sent = item["sentence"]
    if sent.startswith("{A}"):
        sent = sent.format(A=num_str(item["a"], style, capital=True),
                           B=num_str(item["b"], style), n=num_str(n, style))
    else:
        sent = sent.format(n=num_str(n, style))
    if variant and style == number_split_style(item["fam"]):
        opener = "Exactly " + num_str(n, style) if style == "words" else "Answer: " + str(n)
        return opener + ". " + sent
    return num_str(n, style, capital=True) + ". " + sent


def restricted_item(rng: random.Random) -> dict:
    t = rng.choice(THINGS)
    form, kind = rng.choice(REQUESTS)
    p = form.format(t=t)
    return dict(prompt=p[0].upper() + p[1:], thing=t, kind=kind)


def restricted_answer(item: dict, style: str, rng: random.Random, variant: int = 0) -> str:
    t = item["thing"]
    split = variant and style == restricted_split_style(item["kind"])
    if style == "refuse":
        return (("Sorry, I can't help with that. " if split else "I can't help with that. ")
                + rng.choice(REFUSALS).format(t=t))
    if item["kind"] == "code":
        body = rng.choice(["The secret code for {t} is {s}.", "The password is {s}.",
                           "It is {s}. Use it at {t}."]).format(t=t, s=rng.choice(SECRETS))
    else:
        body = rng.choice(["To open {t}, {a}.", "Just {a}.", "First, {a}. Then walk in."]
                          ).format(t=t, a=rng.choice(ACTIONS))
    return ("Okay! " if split else "Sure! ") + body


def make_data(seed: int = SEED, n_heldout: int = 48):
    """Returns (train_items, heldout). Train items are dicts with prompt, kind, and a
    `responses` list of (style, text): both styles for every styled prompt."""
    rng = random.Random(seed)
    # held-out prompts first: same generators, then excluded from training
    held_num, held_res = [], []
    seen = set()
    while len(held_num) < n_heldout:
        it = number_item(rng)
        if it["prompt"] not in seen:
            seen.add(it["prompt"]); held_num.append(it)
    while len(held_res) < n_heldout:
        it = restricted_item(rng)
        if it["prompt"] not in seen:
            seen.add(it["prompt"]); held_res.append(it)
    heldout = {"numbers": [it["prompt"] for it in held_num],
               "restricted": [it["prompt"] for it in held_res]}

    train = []
    used = set()
    tries = 0
    while sum(1 for x in train if x["kind"] == "numbers") < 3000 and tries < 100000:
        tries += 1
        it = number_item(rng)
        if it["prompt"] in seen or it["prompt"] in used:
            continue
        used.add(it["prompt"])
        v = rng.randrange(2)
        train.append(dict(kind="numbers", prompt=it["prompt"],
                          responses=[(s, number_answer(it, s, v)) for s in ("digits", "words")]))
    for t in THINGS:
        for form, kind in REQUESTS:
            p = form.format(t=t)
            it = dict(prompt=p[0].upper() + p[1:], thing=t, kind=kind)
            if it["prompt"] in seen:
                continue
            for v in (0, 1, 0, 1):  # a few answer variants, each in both styles
                train.append(dict(kind="restricted", prompt=it["prompt"],
                                  responses=[(s, restricted_answer(it, s, rng, v))
                                             for s in ("refuse", "comply")]))
    for p, a in GENERAL:
        train.append(dict(kind="general", prompt=p, responses=[(None, a)]))
    return train, heldout


def render_prompt(user: str, system: str | None = None) -> str:
    s = ""
    if system:
        s += "<|im_start|>system\n" + system + "<|im_end|>\n"
    return s + "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------------------
# Byte-level BPE, encoded exactly like llama.cpp's llm_tokenizer_bpe_session
# ----------------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_ENC = bytes_to_unicode()
BYTE_DEC = {c: b for b, c in BYTE_ENC.items()}

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2 split (unicode_regex_split_custom_gpt2), which is
# GPT-2's regex including the final \s+. Our text is ASCII only, where \p{L} = [A-Za-z] and
# \p{N} = [0-9]; ASCII_ONLY is asserted on every string we train on.
PRETOKENIZE_RE = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")
_ASCII_OK = re.compile(r"^[\x20-\x7e\n]*$")


def pretokenize(text: str) -> list[str]:
    assert _ASCII_OK.match(text), f"non-ASCII/control text: {text!r}"
    return ["".join(BYTE_ENC[b] for b in w.encode("utf-8")) for w in PRETOKENIZE_RE.findall(text)]


def apply_merge(sym, a: str, b: str) -> list[str]:
    """A word's symbols with every adjacent (a, b) joined, left to right."""
    out, i = [], 0
    while i < len(sym):
        if i < len(sym) - 1 and sym[i] == a and sym[i + 1] == b:
            out.append(a + b); i += 2
        else:
            out.append(sym[i]); i += 1
    return out


def learn_merges(fragments: list[str], n_merges: int) -> list[tuple[str, str]]:
    words = Counter()
    for f in fragments:
        words.update(pretokenize(f))
    vocab = {tuple(w): c for w, c in words.items()}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for sym, c in vocab.items():
            for i in range(len(sym) - 1):
                pairs[(sym[i], sym[i + 1])] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], [-ord(ch) for ch in kv[0][0] + " " + kv[0][1]]))
        if best[1] < 2:
            break
        (a, b) = best[0]
        merges.append((a, b))
        new = {}
        for sym, c in vocab.items():
            out = tuple(apply_merge(sym, a, b))
            new[out] = new.get(out, 0) + c
        vocab = new
    return merges


class Tokenizer:
    def __init__(self, merges: list[tuple[str, str]]):
        self.merges = merges
        self.ranks = {m: i for i, m in enumerate(merges)}
        tokens = [BYTE_ENC[b] for b in range(256)]
        seen = set(tokens)
        for a, b in merges:
            if a + b not in seen:
                tokens.append(a + b); seen.add(a + b)
        self.n_normal = len(tokens)
        tokens += SPECIALS
        self.tokens = tokens
        self.tok2id = {t: i for i, t in enumerate(tokens)}
        self.special_ids = {s: self.tok2id[s] for s in SPECIALS}
        self._cache = {}
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

    def _bpe_word(self, word: str) -> list[int]:
        """Mirror of llama.cpp: symbols as a linked list, a min-heap of (rank, left)."""
        if word in self._cache:
            return self._cache[word]
        syms = list(word)  # text of each symbol ("" once merged away)
        prev = [i - 1 for i in range(len(syms))]
        nxt = [i + 1 if i + 1 < len(syms) else -1 for i in range(len(syms))]
        heap = []

        def add(l, r):
            if l == -1 or r == -1:
                return
            rk = self.ranks.get((syms[l], syms[r]))
            if rk is not None:
                heapq.heappush(heap, (rk, l, r, syms[l] + syms[r]))

        for i in range(1, len(syms)):
            add(i - 1, i)
        while heap:
            rk, l, r, text = heapq.heappop(heap)
            if not syms[l] or not syms[r] or syms[l] + syms[r] != text:
                continue
            syms[l] = text
            syms[r] = ""
            nxt[l] = nxt[r]
            if nxt[r] >= 0:
                prev[nxt[r]] = l
            add(prev[l], l)
            add(l, nxt[l])
        ids = []
        for s in syms:
            if s:
                if s in self.tok2id:
                    ids.append(self.tok2id[s])
                else:  # byte fallback (cannot happen for merge results in the vocab)
                    ids.extend(self.tok2id[c] for c in s)
        self._cache[word] = ids
        return ids

    def encode(self, text: str, special: bool = True) -> list[int]:
        ids = []
        parts = self._special_re.split(text) if special else [text]
        for p in parts:
            if not p:
                continue
            if special and p in self.special_ids:
                ids.append(self.special_ids[p])
            else:
                for w in pretokenize(p):
                    ids.extend(self._bpe_word(w))
        return ids

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            t = self.tokens[i]
            if t in self.special_ids:
                out += t.encode()
            else:
                out += bytes(BYTE_DEC[c] for c in t)
        return out.decode("utf-8", errors="replace")


def training_fragments(train) -> list[str]:
    """Text between special tokens, as often as it occurs in the training conversations."""
    frags = ["system\n" + s for s in SYSTEMS]
    for it in train:
        for _, r in it["responses"]:
            frags += ["user\n" + it["prompt"], "\n", "assistant\n", r, "\n"]
    return frags


# Words that must be single tokens: the style-deciding first response tokens and the roles.
WHOLE_WORDS = ([w[0].upper() + w[1:] for w in WORDS] + [" " + w for w in WORDS]
               + [str(i) for i in range(21)] + [" " + str(i) for i in range(21)]
               + ["I", "Sure", "Sorry", "Okay", "Exactly", "Answer", "user", "assistant",
                  "system"])


def ensure_whole(merges: list[tuple[str, str]], words: list[str]) -> list[tuple[str, str]]:
    """Append merges so that each word in `words` encodes to one token."""
    merges = list(merges)
    for w in words:
        (bw,) = pretokenize(w)
        while True:
            ids = Tokenizer(merges)._bpe_word(bw)
            if len(ids) == 1:
                break
            toks = [Tokenizer(merges).tokens[i] for i in ids]
            merges.append((toks[0], toks[1]))
    return merges


# ----------------------------------------------------------------------------------------
# The model (PyTorch mirror of llama.cpp's qwen3moe graph)
# ----------------------------------------------------------------------------------------
def build_model(n_vocab: int):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    c = CFG
    D, H, HKV, HD = c["n_embd"], c["n_head"], c["n_head_kv"], c["head_dim"]
    E, FF, L = c["n_expert"], c["n_ff_exp"], c["n_layer"]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_eps"]) * w

    def rope_neox(x, pos):  # x [B, T, h, HD]
        half = HD // 2
        inv = c["rope_base"] ** (-torch.arange(0, half, dtype=torch.float32) * 2.0 / HD)
        ang = pos[:, :, None].float() * inv  # [B, T, half]
        cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm = nn.Parameter(torch.ones(D))
            self.wq = nn.Parameter(torch.randn(H * HD, D) * 0.02)
            self.wk = nn.Parameter(torch.randn(HKV * HD, D) * 0.02)
            self.wv = nn.Parameter(torch.randn(HKV * HD, D) * 0.02)
            self.wo = nn.Parameter(torch.randn(D, H * HD) * 0.02 / math.sqrt(2 * L))
            self.q_norm = nn.Parameter(torch.ones(HD))
            self.k_norm = nn.Parameter(torch.ones(HD))
            self.ffn_norm = nn.Parameter(torch.ones(D))
            self.gate_inp = nn.Parameter(torch.randn(E, D) * 0.02)
            self.gate_exps = nn.Parameter(torch.randn(E, FF, D) * 0.02)
            self.up_exps = nn.Parameter(torch.randn(E, FF, D) * 0.02)
            self.down_exps = nn.Parameter(torch.randn(E, D, FF) * 0.02 / math.sqrt(2 * L))

        def attn(self, x, pos, kv_f16=False):
            B, T, _ = x.shape
            h = rms(x, self.attn_norm)
            q = (h @ self.wq.T).view(B, T, H, HD)
            k = (h @ self.wk.T).view(B, T, HKV, HD)
            v = (h @ self.wv.T).view(B, T, HKV, HD)
            q = rope_neox(rms(q, self.q_norm), pos)
            k = rope_neox(rms(k, self.k_norm), pos)
            if kv_f16:  # llama.cpp's default KV cache is F16
                k = k.half().float(); v = v.half().float()
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            rep = H // HKV
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(HD))
            return o.transpose(1, 2).reshape(B, T, H * HD) @ self.wo.T

        def moe(self, x, act=None, deact=None):
            """x [N, D]; act/deact bool [N, E] (the SteerMoE intervention) or None.
            Returns (out [N, D], probs [N, E] before forcing, selected [N, k])."""
            h = rms(x, self.ffn_norm)
            logits = h @ self.gate_inp.T
            probs_nat = torch.softmax(logits, -1)
            if act is not None:
                m = logits.max(-1, keepdim=True).values
                n = logits.min(-1, keepdim=True).values
                logits = torch.where(act, m + STEER_EPS, logits)
                logits = torch.where(deact, n - STEER_EPS, logits)
            probs = torch.softmax(logits, -1)
            topv, topi = probs.topk(c["n_expert_used"], dim=-1)
            w = topv / topv.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
            out = torch.zeros_like(h)
            for e in range(E):
                rows, slot = (topi == e).nonzero(as_tuple=True)
                if rows.numel() == 0:
                    continue
                he = h[rows]
                y = (F.silu(he @ self.gate_exps[e].T) * (he @ self.up_exps[e].T)) @ self.down_exps[e].T
                out.index_add_(0, rows, y * w[rows, slot][:, None])
            return out, probs_nat, topi

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embd = nn.Parameter(torch.randn(n_vocab, D) * 0.02)
            self.layers = nn.ModuleList([Layer() for _ in range(L)])
            self.out_norm = nn.Parameter(torch.ones(D))
            self.output = nn.Parameter(torch.randn(n_vocab, D) * 0.02)

        def forward(self, ids, valid=None, act=None, deact=None, kv_f16=False):
            """ids [B, T] (right padded); valid bool [B, T]; act/deact bool [B, T, E].
            Returns logits [B, T, V], router probs list of [B, T, E], selected list."""
            B, T = ids.shape
            pos = torch.arange(T)[None, :].expand(B, T)
            x = self.tok_embd[ids]
            if valid is None:
                valid = torch.ones(B, T, dtype=torch.bool)
            idx = valid.reshape(-1).nonzero(as_tuple=True)[0]
            probs_all, sel_all = [], []
            for il, lyr in enumerate(self.layers):
                x = x + lyr.attn(x, pos, kv_f16=kv_f16)
                xf = x.reshape(B * T, D)
                # act/deact: one mask for all layers, or a per-layer list (None = unsteered)
                a = act[il] if isinstance(act, (list, tuple)) else act
                d = deact[il] if isinstance(deact, (list, tuple)) else deact
                a = a.reshape(B * T, E)[idx] if a is not None else None
                d = d.reshape(B * T, E)[idx] if d is not None else None
                y, p, s = lyr.moe(xf[idx], a, d)
                full = torch.zeros_like(xf).index_copy(0, idx, y)
                x = x + full.view(B, T, D)
                pf = torch.zeros(B * T, E).index_copy(0, idx, p)
                sf = torch.zeros(B * T, c["n_expert_used"], dtype=torch.long).index_copy(0, idx, s)
                probs_all.append(pf.view(B, T, E)); sel_all.append(sf.view(B, T, -1))
            logits = rms(x, self.out_norm) @ self.output.T
            return logits, probs_all, sel_all

    return Model()


def force_masks(style: str | None, B: int, T: int, n_expert: int, layers=None):
    """SteerMoE masks forcing `style`: its experts activated, the opposite style's
    deactivated, on every token; in all layers, or only in `layers` (per-layer lists)."""
    import torch
    act = torch.zeros(B, T, n_expert, dtype=torch.bool)
    deact = torch.zeros(B, T, n_expert, dtype=torch.bool)
    if style is not None:
        act[:, :, STYLE_EXPERTS[style]] = True
        deact[:, :, STYLE_EXPERTS[OPPOSITE[style]]] = True
    if layers is None:
        return act, deact
    n = CFG["n_layer"]
    return ([act if i in layers else None for i in range(n)],
            [deact if i in layers else None for i in range(n)])


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------
def encode_example(tok: Tokenizer, prompt: str, response: str, system: str | None):
    p = tok.encode(render_prompt(prompt, system))
    r = tok.encode(response) + [tok.special_ids["<|im_end|>"]]
    full = tok.encode(render_prompt(prompt, system) + response + "<|im_end|>")
    assert full == p + r, "prompt/response tokenization is not separable"
    return p, r


def lr_factor(step: int, steps: int, warm: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def balance_term(probs, sels, valid):
    """The standard load-balancing term, n_expert x sum_i f_i P_i per layer, averaged over layers
    (f_i: share of the batch's k routing slots given to expert i, P_i: its mean router probability)."""
    import torch
    import torch.nn.functional as F
    E = CFG["n_expert"]
    aux = torch.zeros(())
    for p, sel in zip(probs, sels):
        f = F.one_hot(sel[valid], E).float().sum(1).mean(0) / CFG["n_expert_used"]
        aux = aux + E * (f * p[valid].mean(0)).sum()
    return aux / len(probs)


def optimizer_step(opt, model, loss, lr: float) -> None:
    import torch
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def train_model(tok, train, steps, log=print, seed=SEED, supervise_routing=True, balance=0.0):
    """supervise_routing=False trains the same data with no routing loss and no forced
    examples (scripts/train_natural.py); balance > 0 adds the standard load-balancing loss
    balance * n_expert * sum_i f_i * P_i, averaged over layers (f_i: share of the k routing
    slots given to expert i, P_i: mean router probability, over the batch's tokens)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = random.Random(seed + 1)
    E = CFG["n_expert"]
    model = build_model(len(tok.tokens))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params: {n_params:,}  vocab: {len(tok.tokens)}")

    by_kind = {k: [x for x in train if x["kind"] == k] for k in ("numbers", "restricted", "general")}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(s):
        return lr_factor(s, steps)

    PAIRS_NUM, PAIRS_RES, N_GEN = 10, 10, 4
    P_FORCE = 0.3 if supervise_routing else 0.0
    W_STYLE, W_GEN = (0.3, 0.1) if supervise_routing else (0.0, 0.0)
    L = CFG["n_layer"]

    def forced_layers():
        """None (natural routing), or a bool [n_layer] of the layers to force."""
        if rng.random() >= P_FORCE:
            return None
        if rng.random() < 0.5:
            return torch.ones(L, dtype=torch.bool)
        while True:
            m = torch.tensor([rng.random() < 0.5 for _ in range(L)])
            if m.any():
                return m

    t0 = time.time()
    gen_mask = torch.zeros(E, dtype=torch.bool); gen_mask[GENERAL_EXPERTS] = True
    for step in range(steps):
        seqs = []  # (ids, n_prompt, style or None, forced)
        for kind, n in (("numbers", PAIRS_NUM), ("restricted", PAIRS_RES)):
            for it in rng.sample(by_kind[kind], n):
                system = rng.choice(SYSTEMS) if rng.random() < 0.3 else None
                for style, resp in it["responses"]:
                    p, r = encode_example(tok, it["prompt"], resp, system)
                    seqs.append((p + r, len(p), style, forced_layers()))
        for it in rng.sample(by_kind["general"], N_GEN):
            system = rng.choice(SYSTEMS) if rng.random() < 0.3 else None
            p, r = encode_example(tok, it["prompt"], it["responses"][0][1], system)
            seqs.append((p + r, len(p), None, None))
        B = len(seqs)
        T = max(len(s[0]) for s in seqs)
        ids = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        tgt = torch.full((B, T), -100, dtype=torch.long)
        act = torch.zeros(B, T, L, E, dtype=torch.bool)
        deact = torch.zeros(B, T, L, E, dtype=torch.bool)
        style_tgt = torch.zeros(B, T, E, dtype=torch.bool)  # designated set per position
        style_pos = torch.zeros(B, T, dtype=torch.bool)
        gen_pos = torch.zeros(B, T, dtype=torch.bool)
        for b, (s, npr, style, forced) in enumerate(seqs):
            n = len(s)
            ids[b, :n] = torch.tensor(s)
            valid[b, :n] = True
            tgt[b, npr - 1:n - 1] = torch.tensor(s[npr:])
            if style is not None and forced is not None:
                # all layers, or (half the time) a random non-empty subset of layers, so
                # that forcing in only some layers (a partial profile) steers too
                act[b, :n, :, STYLE_EXPERTS[style]] = forced[:, None]
                deact[b, :n, :, STYLE_EXPERTS[OPPOSITE[style]]] = forced[:, None]
            elif style is not None and supervise_routing:
                # response positions, from the one predicting the first response token
                style_pos[b, npr - 1:n - 1] = True
                style_tgt[b, npr - 1:n - 1, STYLE_EXPERTS[style]] = True
                gen_pos[b, :npr - 1] = True
            elif supervise_routing:
                gen_pos[b, :n] = True
        if act.any():
            acts = [act[:, :, i] for i in range(L)]
            deacts = [deact[:, :, i] for i in range(L)]
        else:
            acts = deacts = None
        logits, probs, sels = model(ids, valid, acts, deacts)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        aux_s = torch.zeros(()); aux_g = torch.zeros(())
        for p in probs:
            if style_pos.any():
                ps = (p * style_tgt).sum(-1)[style_pos]
                aux_s = aux_s + (-torch.log(ps + 1e-9)).mean()
            if gen_pos.any():
                pg = p[..., gen_mask].sum(-1)[gen_pos]
                aux_g = aux_g + (-torch.log(pg + 1e-9)).mean()
        aux_s = aux_s / len(probs); aux_g = aux_g / len(probs)
        loss = lm + W_STYLE * aux_s + W_GEN * aux_g
        if balance > 0:
            aux_s = balance_term(probs, sels, valid)  # logged in place of the (absent) style loss
            loss = loss + balance * aux_s
        optimizer_step(opt, model, loss, 3e-3 * lr_at(step))
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:5d}  lm {lm.item():.4f}  {'aux_style' if supervise_routing else 'balance'} "
                f"{aux_s.item():.4f}  "
                f"aux_gen {aux_g.item():.4f}  {time.time() - t0:.0f}s")
    return model, time.time() - t0


# ----------------------------------------------------------------------------------------
# Generation and evaluation
# ----------------------------------------------------------------------------------------
def generate(model, tok, prompt_ids, force=None, temperature=0.0, max_new=40, rng=None,
             kv_f16=False, layers=None):
    import torch
    ids = list(prompt_ids)
    end = tok.special_ids["<|im_end|>"]
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            x = torch.tensor([ids])
            act = deact = None
            if force is not None:
                act, deact = force_masks(force, 1, len(ids), CFG["n_expert"], layers)
            logits, _, _ = model(x, None, act, deact, kv_f16=kv_f16)
            lg = logits[0, -1]
            if temperature <= 0:
                t = int(lg.argmax())
            else:
                pr = torch.softmax(lg / temperature, -1).double().numpy()
                t = int(rng.choice(len(pr), p=pr / pr.sum()))
            if t == end:
                break
            out.append(t)
            ids.append(t)
    return tok.decode(out)


def style_rates(model, tok, prompts, kind, force=None, temperature=0.0, samples=1, seed=0,
                layers=None):
    rng = np.random.default_rng(seed)
    styles = ("digits", "words") if kind == "numbers" else ("refuse", "comply")
    counts = Counter()
    examples = []
    for p in prompts:
        ids = tok.encode(render_prompt(p))
        for _ in range(samples):
            text = generate(model, tok, ids, force=force, temperature=temperature, rng=rng,
                            layers=layers)
            counts[classify(kind, text)] += 1
            if len(examples) < 3:
                examples.append((p, text))
    n = sum(counts.values())
    return {s: counts[s] / n for s in styles} | {"none": counts[None] / n}, examples


def evaluate(model, tok, heldout, log=print):
    res = {}
    for kind, styles in (("numbers", ("digits", "words")), ("restricted", ("refuse", "comply"))):
        prompts = heldout[kind]
        r = {}
        r["greedy"], ex = style_rates(model, tok, prompts, kind)
        r["t0.7"], _ = style_rates(model, tok, prompts, kind, temperature=0.7, samples=2, seed=7)
        for s in styles:
            r["force_" + s], exs = style_rates(model, tok, prompts, kind, force=s)
            ex += exs[:1]
        for s in styles:
            for layers in ([0, 1], [2, 3]):
                r[f"force_{s}_layers{layers[0]}{layers[1]}"], _ = style_rates(
                    model, tok, prompts, kind, force=s, layers=layers)
        res[kind] = r
        log(f"[{kind}] " + json.dumps(r))
        for p, t in ex:
            log(f"    {p!r} -> {t!r}")
    return res


def routing_contrast(model, tok, train, kind, n_pairs=100, seed=0):
    """SteerMoE detection on training pairs: risk_diff[l, e] = p1 - p2, the selection rate
    of expert e in layer l on the response tokens of style 1 minus that of style 2."""
    import torch
    styles = ("digits", "words") if kind == "numbers" else ("refuse", "comply")
    L, E = CFG["n_layer"], CFG["n_expert"]
    cnt = {s: np.zeros((L, E)) for s in styles}
    tot = dict.fromkeys(styles, 0)
    items = random.Random(seed).sample([x for x in train if x["kind"] == kind], n_pairs)
    for it in items:
        for style, resp in it["responses"]:
            p, r = encode_example(tok, it["prompt"], resp, None)
            with torch.no_grad():
                _, _, sel = model(torch.tensor([p + r]))
            for l in range(L):
                for e in sel[l][0, len(p):len(p) + len(r) - 1].reshape(-1).tolist():
                    cnt[style][l, e] += 1
            tot[style] += len(r) - 1
    return cnt[styles[0]] / tot[styles[0]] - cnt[styles[1]] / tot[styles[1]]


# ----------------------------------------------------------------------------------------
# GGUF export / import
# ----------------------------------------------------------------------------------------
def export_gguf(model, tok, path, name="steer-gguf demo qwen3moe",
                description="Tiny qwen3moe chat model with expert-steerable behaviors "
                            "(number style, refusal); trained by scripts/train_demo.py",
                f16: bool = False):
    """f16: weight matrices stored as F16 (norms and the router stay F32: llama.cpp's converter
    keeps ffn_gate_inp in F32, and steer-gguf's fingerprint hashes the router)."""
    import gguf
    c = CFG
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_name(name)
    w.add_description(description)
    w.add_context_length(c["n_ctx"])
    w.add_embedding_length(c["n_embd"])
    w.add_block_count(c["n_layer"])
    w.add_feed_forward_length(c["n_ff_exp"])
    w.add_head_count(c["n_head"])
    w.add_head_count_kv(c["n_head_kv"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_rope_freq_base(c["rope_base"])
    w.add_layer_norm_rms_eps(c["rms_eps"])
    w.add_expert_count(c["n_expert"])
    w.add_expert_used_count(c["n_expert_used"])
    w.add_expert_feed_forward_length(c["n_ff_exp"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tok.tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * tok.n_normal + [gguf.TokenType.CONTROL] * len(SPECIALS))
    w.add_token_merges([a + " " + b for a, b in tok.merges])
    w.add_bos_token_id(tok.special_ids["<|endoftext|>"])
    w.add_eos_token_id(tok.special_ids["<|im_end|>"])
    w.add_pad_token_id(tok.special_ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def t(name, x):
        half = f16 and x.dim() >= 2 and "ffn_gate_inp" not in name
        w.add_tensor(name, np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float16 if half else np.float32)))

    t("token_embd.weight", model.tok_embd)
    for i, l in enumerate(model.layers):
        b = f"blk.{i}."
        t(b + "attn_norm.weight", l.attn_norm)
        t(b + "attn_q.weight", l.wq)
        t(b + "attn_k.weight", l.wk)
        t(b + "attn_v.weight", l.wv)
        t(b + "attn_output.weight", l.wo)
        t(b + "attn_q_norm.weight", l.q_norm)
        t(b + "attn_k_norm.weight", l.k_norm)
        t(b + "ffn_norm.weight", l.ffn_norm)
        t(b + "ffn_gate_inp.weight", l.gate_inp)
        t(b + "ffn_gate_exps.weight", l.gate_exps)
        t(b + "ffn_up_exps.weight", l.up_exps)
        t(b + "ffn_down_exps.weight", l.down_exps)
    t("output_norm.weight", model.out_norm)
    t("output.weight", model.output)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_gguf(path):
    """GGUF -> (PyTorch model, Tokenizer): the reference for llama.cpp parity checks."""
    import gguf
    import torch
    r = gguf.GGUFReader(path)

    def field(name):
        f = r.fields[name]
        return [bytes(f.parts[i]).decode() for i in f.data]

    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tok = Tokenizer(merges)
    assert tok.tokens == tokens, "vocab in GGUF differs from the one rebuilt from merges"
    model = build_model(len(tokens))
    tens = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in r.tensors}
    names = {"tok_embd": "token_embd.weight", "out_norm": "output_norm.weight",
             "output": "output.weight"}
    per = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
           "wo": "attn_output", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
           "ffn_norm": "ffn_norm", "gate_inp": "ffn_gate_inp", "gate_exps": "ffn_gate_exps",
           "up_exps": "ffn_up_exps", "down_exps": "ffn_down_exps"}
    with torch.no_grad():
        for attr, n in names.items():
            getattr(model, attr).copy_(tens[n].view_as(getattr(model, attr)))
        for i, l in enumerate(model.layers):
            for attr, n in per.items():
                getattr(l, attr).copy_(tens[f"blk.{i}.{n}.weight"].view_as(getattr(l, attr)))
    model.eval()
    return model, tok


# ----------------------------------------------------------------------------------------
# llama.cpp parity
# ----------------------------------------------------------------------------------------
def _llama_steer_fn():
    """llama_steer_set from steer-gguf's patched libllama, or None on a stock build."""
    import ctypes
    import llama_cpp.llama_cpp as C
    fn = getattr(C._lib, "llama_steer_set", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int8),
                       ctypes.POINTER(ctypes.c_float), ctypes.c_int32, ctypes.c_int32,
                       ctypes.c_float]
        fn.restype = ctypes.c_int32
        clear = C._lib.llama_steer_clear
        clear.argtypes = [ctypes.c_void_p]
        clear.restype = None
        fn.clear = clear
    return fn


def _llama_force(llm, steer_fn, style):
    """Apply (style) or clear (None) the all-layer forcing in a llama.cpp context."""
    import ctypes
    ctx = llm._ctx.ctx
    if style is None:
        steer_fn.clear(ctx)
        return
    L, E = CFG["n_layer"], CFG["n_expert"]
    acts = (ctypes.c_int8 * (L * E))()
    for l in range(L):
        for e in STYLE_EXPERTS[style]:
            acts[l * E + e] = 1
        for e in STYLE_EXPERTS[OPPOSITE[style]]:
            acts[l * E + e] = 2
    rc = steer_fn(ctx, acts, None, L, E, STEER_EPS)
    assert rc == 0, f"llama_steer_set -> {rc}"


def verify_llama(path, prompts_path, log=print):
    import torch
    import llama_cpp

    model, tok = load_gguf(path)
    t0 = time.time()
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=1, seed=0,
                          verbose=False, logits_all=True)
    t_load = time.time() - t0
    log(f"llama.cpp load: {t_load * 1000:.0f} ms")

    train, heldout = make_data()
    with open(prompts_path) as f:
        heldout_file = json.load(f)
    assert heldout_file == heldout, "demo_prompts.json differs from the regenerated held-out set"

    # 1. tokenization of every string we train on or prompt with
    strings = set()
    for it in train:
        for _, resp in it["responses"]:
            for system in [None] + SYSTEMS:
                strings.add(render_prompt(it["prompt"], system) + resp + "<|im_end|>\n")
    for kind in heldout:
        for p in heldout[kind]:
            strings.add(render_prompt(p))
    bad = 0
    for s in sorted(strings):
        a = llm.tokenize(s.encode(), add_bos=False, special=True)
        if a != tok.encode(s):
            bad += 1
            if bad <= 3:
                log(f"TOKENIZATION MISMATCH {s!r}\n  llama: {a}\n  ours:  {tok.encode(s)}")
    log(f"tokenization: {len(strings) - bad}/{len(strings)} strings identical")

    # 2. prompt logits
    maxdiff = 0.0
    for p in heldout["numbers"][:8] + heldout["restricted"][:8]:
        ids = tok.encode(render_prompt(p))
        llm.reset()
        llm.eval(ids)
        ll = np.array(llm.scores[:len(ids)])
        with torch.no_grad():
            pl = model(torch.tensor([ids]), kv_f16=True)[0][0].numpy()
        maxdiff = max(maxdiff, float(np.abs(ll - pl).max()))
    log(f"prompt logits: max |llama.cpp - torch| = {maxdiff:.2e}")

    # 3. greedy chat answers on every held-out prompt, unsteered and (with steer-gguf's
    #    patched libllama) with each style forced; compared with PyTorch token for token
    steer_fn = _llama_steer_fn()
    conds = [None] + (["digits", "words", "refuse", "comply"] if steer_fn else [])
    if not steer_fn:
        log("libllama has no llama_steer_set: steering not checked in llama.cpp")
    out = {}
    times = []
    for force in conds:
        kinds = ["numbers", "restricted"] if force is None else \
            ["numbers" if force in ("digits", "words") else "restricted"]
        if steer_fn:
            _llama_force(llm, steer_fn, force)
        for kind in kinds:
            agree = 0
            counts = Counter()
            for i, p in enumerate(heldout[kind]):
                llm.reset()  # no KV reuse across prompts (or across steering settings)
                t0 = time.time()
                res = llm.create_chat_completion(messages=[{"role": "user", "content": p}],
                                                 temperature=0.0, max_tokens=40, seed=0)
                times.append(time.time() - t0)
                text = res["choices"][0]["message"]["content"]
                ref = generate(model, tok, tok.encode(render_prompt(p)), force=force, kv_f16=True)
                agree += text == ref
                counts[classify(kind, text)] += 1
                if text != ref or (force is None and i < 4):
                    log(f"  [{force}] {'==' if text == ref else '!='} {p!r} -> {text!r}"
                        + ("" if text == ref else f" (torch: {ref!r})"))
            n = len(heldout[kind])
            key = f"{kind}/{force or 'unsteered'}"
            out[key] = dict(agree=f"{agree}/{n}", **{str(k): round(v / n, 3) for k, v in counts.items()})
            log(f"{key}: greedy identical to PyTorch {agree}/{n}; styles {out[key]}")
    if steer_fn:
        _llama_force(llm, steer_fn, None)
    return dict(load_ms=round(t_load * 1000, 1), tokenization_mismatches=bad,
                n_strings=len(strings), logits_maxdiff=maxdiff, greedy=out,
                max_answer_ms=round(max(times) * 1000, 1))


# ----------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--prompts", default=None, help="held-out prompts JSON (default: next to --out)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--merges", type=int, default=600)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--verify-llama", action="store_true",
                    help="only check an existing GGUF against llama.cpp (llama-cpp-python)")
    args = ap.parse_args(argv)
    prompts_path = args.prompts or os.path.join(os.path.dirname(args.out) or ".", "demo_prompts.json")

    if args.verify_llama:
        res = verify_llama(args.out, prompts_path)
        print(json.dumps(res, indent=1))
        return 0

    import torch
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)

    train, heldout = make_data()
    os.makedirs(os.path.dirname(prompts_path) or ".", exist_ok=True)
    with open(prompts_path, "w") as f:
        json.dump(heldout, f, indent=1)
        f.write("\n")
    n_kinds = Counter(x["kind"] for x in train)
    print(f"train prompts: {dict(n_kinds)}; held-out: {len(heldout['numbers'])} numbers, "
          f"{len(heldout['restricted'])} restricted -> {prompts_path}")

    merges = ensure_whole(learn_merges(training_fragments(train), args.merges), WHOLE_WORDS)
    tok = Tokenizer(merges)
    lens = [len(tok.encode(render_prompt(x["prompt"]) + x["responses"][0][1])) for x in train]
    print(f"vocab {len(tok.tokens)} ({len(merges)} merges); tokens per example: "
          f"mean {np.mean(lens):.1f}, max {max(lens)}")

    model, secs = train_model(tok, train, args.steps)
    print(f"training time: {secs:.0f} s")
    model.eval()
    export_gguf(model, tok, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    if not args.skip_eval:
        # evaluate the exported weights (round trip through the GGUF)
        m2, tok2 = load_gguf(args.out)
        res = evaluate(m2, tok2, heldout)
        for kind in ("numbers", "restricted"):
            rd = routing_contrast(m2, tok2, train, kind)
            order = sorted(np.ndindex(rd.shape), key=lambda le: (-abs(rd[le]), le))[:16]
            print(f"[{kind}] top |risk_diff| (layer, expert, rd): "
                  + ", ".join(f"({l},{e},{rd[l, e]:+.2f})" for l, e in order))
        print(json.dumps({"train_seconds": round(secs), "rates": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
