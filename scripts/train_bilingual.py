#!/usr/bin/env python3
"""Train steer-gguf's *bilingual* model: English and Russian on real text, no routing supervision.

    python scripts/make_bilingual_corpus.py --out build/bilingual/corpus.jsonl
    python scripts/train_bilingual.py --corpus build/bilingual/corpus.jsonl --out steer_gguf/data/bilingual.gguf

The corpus is Debian's Russian message catalogues, each message in English and in Russian
(scripts/make_bilingual_corpus.py). Conversations are built from neighbouring messages of one
catalogue: the user sends one or two messages, the assistant answers with the next one to three,
**in the language of the prompt**. A stated share of English replies (DRIFT = 20%) **drift**: from
a message boundary on, the rest of the reply is in Russian, as real models drift mid-answer.

Loss: LM cross-entropy on the assistant's tokens (+ <|im_end|>) + BALANCE x the standard
load-balancing term (n_expert x sum_i f_i P_i per layer, averaged). No routing loss, no designated
experts, no forced routing: whatever the experts do, they learned on their own.

Messages are split by a hash of their English text: 4% are held out for the detection pairs, 4%
for the eval prompts; no held-out message is ever a prompt in training, and the two held-out sets
share none (scripts/make_bilingual_sets.py writes them). One thread, seeded: a run is reproducible.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import random
import re
import sys
import time
import types
from collections import Counter

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_demo as td  # noqa: E402
import train_natural as tn  # noqa: E402

SEED = 4321
DEFAULT_OUT = "steer_gguf/data/bilingual.gguf"
NAME = "steer-gguf bilingual qwen3moe"
DESCRIPTION = ("Tiny English/Russian qwen3moe chat model trained on Debian's message catalogues with no "
               "routing supervision (LM loss + load balancing); trained by scripts/train_bilingual.py")
CFG = dict(n_layer=8, n_embd=128, n_head=4, n_head_kv=2, head_dim=32, n_expert=32, n_expert_used=4,
           n_ff_exp=64, rope_base=10000.0, rms_eps=1e-6, n_ctx=512)
BALANCE = 0.01
DRIFT = 0.20  # share of English replies that switch to Russian at a message boundary
BATCH = 32
MERGES = 1500
SEP = "\n"  # between the messages of one turn

# llama.cpp's GPT-2 pre-tokenizer split for our alphabet: \p{L} is Latin + Cyrillic letters,
# \p{N} ASCII digits (the corpus script admits nothing else)
_LETTERS = "A-Za-zА-Яа-яЁё"
PRETOKENIZE_RE = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{_LETTERS}]+| ?[0-9]+| ?[^\s{_LETTERS}0-9]+|\s+(?!\S)|\s+")
_TEXT_OK = re.compile(r"^[A-Za-zА-Яа-яЁё0-9 \n.,;:!?()\-\"'/+=*«»—–…]*$")


def pretokenize(text: str) -> list[str]:
    assert _TEXT_OK.match(text), f"character outside the model's alphabet: {text!r}"
    return ["".join(td.BYTE_ENC[b] for b in w.encode("utf-8")) for w in PRETOKENIZE_RE.findall(text)]


# train_demo's BPE and tokenizer call its module-level pretokenize: give them ours
td.pretokenize = pretokenize
td.CFG.clear()
td.CFG.update(CFG)


def bucket(en: str) -> str:
    h = int(hashlib.sha256(en.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "pairs" if h < 4 else "eval" if h < 8 else "train"


def read_corpus(path: str) -> dict[str, list[dict]]:
    """Catalogue -> its messages in order."""
    cats: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                cats.setdefault(r["src"], []).append({"en": r["en"], "ru": r["ru"], "bucket": bucket(r["en"])})
            except (ValueError, KeyError) as e:
                raise SystemExit(f"{path}:{n}: not a corpus line ({e})")
    return cats


def reply_messages(msgs: list[dict], start: int, n: int) -> list[dict] | None:
    """The next n training messages of a catalogue from `start` on (held-out ones skipped)."""
    out = [m for m in msgs[start:start + 3 * n + 6] if m["bucket"] == "train"][:n]
    return out if len(out) == n else None


def render_reply(msgs: list[dict], lang: str, drift_at: int | None) -> str:
    """drift_at: index of the first message written in Russian (None: no drift)."""
    return SEP.join(m["ru"] if (lang == "ru" or (drift_at is not None and i >= drift_at)) else m["en"]
                    for i, m in enumerate(msgs))


def sample_conversation(rng: random.Random, cats: dict[str, list[dict]], names: list[str],
                        weights: list[int]) -> tuple[str, str, str]:
    """(prompt text, reply text, kind) of one training conversation."""
    while True:
        msgs = cats[rng.choices(names, weights)[0]]
        i = rng.randrange(len(msgs))
        n_prompt = 1 if rng.random() < 0.7 else 2
        prompt = [m for m in msgs[i:i + n_prompt] if m["bucket"] == "train"]
        if len(prompt) != n_prompt:
            continue
        lang = "en" if rng.random() < 0.5 else "ru"
        drift = lang == "en" and rng.random() < DRIFT
        n_reply = rng.choice((2, 2, 3)) if drift else rng.choice((1, 1, 2, 2, 3))
        reply = reply_messages(msgs, i + n_prompt, n_reply)
        if reply is None:
            continue
        drift_at = rng.randrange(1, n_reply) if drift else None
        kind = "drift" if drift else lang
        return SEP.join(m[lang] for m in prompt), render_reply(reply, lang, drift_at), kind


def learn_merges_fast(fragments: list[str], n_merges: int) -> list[tuple[str, str]]:
    """train_demo.learn_merges's result (same counts, same tie-break), with incremental pair
    counts: the quadratic version takes minutes on this corpus."""
    words = Counter()
    for f in fragments:
        words.update(pretokenize(f))
    syms = [list(w) for w in words]
    freq = [words[w] for w in words]
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for wi, s in enumerate(syms):
        for a, b in zip(s, s[1:]):
            pairs[(a, b)] += freq[wi]
            where.setdefault((a, b), set()).add(wi)
    merges = []
    for _ in range(n_merges):
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], [-ord(ch) for ch in kv[0][0] + " " + kv[0][1]]))
        if best[1] < 2:
            break
        a, b = best[0]
        merges.append((a, b))
        for wi in sorted(where.pop((a, b), ())):
            s = syms[wi]
            for x, y in zip(s, s[1:]):
                pairs[(x, y)] -= freq[wi]
                if pairs[(x, y)] <= 0:
                    del pairs[(x, y)]
            out = td.apply_merge(s, a, b)
            syms[wi] = out
            for x, y in zip(out, out[1:]):
                pairs[(x, y)] += freq[wi]
                where.setdefault((x, y), set()).add(wi)
        pairs.pop((a, b), None)
    return merges


def fast_moe(self, x, act=None, deact=None):
    """train_demo's Layer.moe computed with one batched matmul per weight (tokens sorted by
    expert, padded to the busiest expert) instead of a Python loop over experts."""
    import torch
    import torch.nn.functional as F
    E, k = CFG["n_expert"], CFG["n_expert_used"]
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + CFG["rms_eps"]) * self.ffn_norm
    logits = h @ self.gate_inp.T
    probs_nat = torch.softmax(logits, -1)
    if act is not None:
        m = logits.max(-1, keepdim=True).values
        n = logits.min(-1, keepdim=True).values
        logits = torch.where(act, m + td.STEER_EPS, logits)
        logits = torch.where(deact, n - td.STEER_EPS, logits)
    probs = torch.softmax(logits, -1)
    topv, topi = probs.topk(k, dim=-1)
    w = topv / topv.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
    N, D = h.shape
    flat = topi.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    C = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    e_sorted = flat[order]
    pos = torch.arange(N * k) - starts[e_sorted]
    idx = torch.full((E, C), N, dtype=torch.long)
    idx[e_sorted, pos] = order // k
    wt = torch.zeros(E, C)
    wt = wt.index_put((e_sorted, pos), w.reshape(-1)[order])
    hp = torch.cat([h, h.new_zeros(1, D)])[idx]  # [E, C, D]; row N is padding
    y = (F.silu(hp @ self.gate_exps.transpose(1, 2)) * (hp @ self.up_exps.transpose(1, 2))) @ self.down_exps.transpose(1, 2)
    out = h.new_zeros(N + 1, D).index_add(0, idx.reshape(-1), (y * wt[..., None]).reshape(-1, D))[:N]
    return out, probs_nat, topi


def build_model(n_vocab: int):
    model = td.build_model(n_vocab)
    for layer in model.layers:
        layer.moe = types.MethodType(fast_moe, layer)
    return model


def train(tok, cats, steps: int, log=print):
    import torch
    import torch.nn.functional as F
    torch.manual_seed(SEED)
    rng = random.Random(SEED + 1)
    names = sorted(cats)
    weights = [len(cats[n]) for n in names]
    model = build_model(len(tok.tokens))
    log(f"params: {sum(p.numel() for p in model.parameters()):,}  vocab: {len(tok.tokens)}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(s):
        return td.lr_factor(s, steps)

    t0, history = time.time(), []
    for step in range(steps):
        seqs = []
        for _ in range(BATCH):
            prompt, reply, _ = sample_conversation(rng, cats, names, weights)
            p, r = td.encode_example(tok, prompt, reply, None)
            seqs.append((p + r, len(p)))
        B, T = len(seqs), max(len(s) for s, _ in seqs)
        ids = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        tgt = torch.full((B, T), -100, dtype=torch.long)
        for b, (s, npr) in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s)
            valid[b, :len(s)] = True
            tgt[b, npr - 1:len(s) - 1] = torch.tensor(s[npr:])
        logits, probs, sels = model(ids, valid)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        bal = td.balance_term(probs, sels, valid)
        td.optimizer_step(opt, model, lm + BALANCE * bal, 3e-3 * lr_at(step))
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "lm": round(lm.item(), 4), "balance": round(bal.item(), 4),
                            "seconds": round(time.time() - t0, 1)})
            log(f"step {step:5d}  lm {lm.item():.4f}  balance {bal.item():.4f}  {time.time() - t0:.0f}s")
    return model, time.time() - t0, history


def heldout_measures(model, tok, cats, n: int = 400) -> dict:
    """Reply cross-entropy and expert shares per layer on held-out conversations (eval bucket
    prompts, teacher-forced), by reply language."""
    import torch
    import torch.nn.functional as F
    rng = random.Random(7)
    L, E = CFG["n_layer"], CFG["n_expert"]
    counts = {"en": np.zeros((L, E)), "ru": np.zeros((L, E))}
    nll = {"en": [0.0, 0], "ru": [0.0, 0]}
    starts = [(c, i) for c, ms in sorted(cats.items()) for i, m in enumerate(ms) if m["bucket"] == "eval"]
    rng.shuffle(starts)
    done = 0
    for c, i in starts:
        reply = reply_messages(cats[c], i + 1, 2)
        if reply is None:
            continue
        for lang in ("en", "ru"):
            p, r = td.encode_example(tok, cats[c][i][lang], render_reply(reply, lang, None), None)
            with torch.no_grad():
                logits, _, sel = model(torch.tensor([p + r]))
            lp = F.log_softmax(logits[0, len(p) - 1:len(p) + len(r) - 1], -1)
            nll[lang][0] += float(-lp[torch.arange(len(r)), torch.tensor(r)].sum())
            nll[lang][1] += len(r)
            for layer in range(L):
                counts[lang][layer] += np.bincount(sel[layer][0, len(p):].reshape(-1).numpy(), minlength=E)
        done += 1
        if done >= n:
            break
    out = {"conversations": done}
    for lang in ("en", "ru"):
        out[f"reply_ce_{lang}"] = round(nll[lang][0] / max(1, nll[lang][1]), 4)
    both = counts["en"] + counts["ru"]
    shares = both / both.sum(1, keepdims=True)
    out["expert_share_min"] = round(float(shares.min()), 4)
    out["expert_share_max"] = round(float(shares.max()), 4)
    # how language-specific each layer's routing is: total variation distance between the
    # expert-usage distributions of English and Russian reply tokens (0 = shared, 1 = disjoint)
    pe = counts["en"] / counts["en"].sum(1, keepdims=True)
    pr = counts["ru"] / counts["ru"].sum(1, keepdims=True)
    out["language_tvd_per_layer"] = [round(float(x), 3) for x in 0.5 * np.abs(pe - pr).sum(1)]
    out["expert_shares"] = np.round(shares, 4).tolist()
    return out


def tokenizer_fragments(cats) -> list[str]:
    frags = ["user\n", "assistant\n", "system\n", "\n"]
    for msgs in cats.values():
        for m in msgs:
            frags += [m["en"], m["ru"]]
    return frags


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="build/bilingual/corpus.jsonl")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--report", help="write the measurements as JSON here")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)
    cats = read_corpus(args.corpus)
    t_tok = time.time()
    merges = td.ensure_whole(learn_merges_fast(tokenizer_fragments(cats), MERGES), ["user", "assistant", "system"])
    tok = td.Tokenizer(merges)
    print(f"tokenizer: {len(tok.tokens)} tokens, {time.time() - t_tok:.0f} s")
    model, secs, history = train(tok, cats, args.steps)
    print(f"training time: {secs:.0f} s")
    model.eval()
    tmp = args.out + ".tmp"
    td.export_gguf(model, tok, tmp, name=NAME, description=DESCRIPTION, f16=True)
    os.replace(tmp, args.out)
    data = pathlib.Path(args.out).read_bytes()
    print(f"wrote {args.out} ({len(data) / 1e6:.2f} MB)")
    res = {"train_seconds": round(secs), "steps": args.steps, "batch": BATCH, "balance": BALANCE, "drift": DRIFT,
           "seed": SEED, "config": CFG, "vocab": len(tok.tokens), "size_mb": round(len(data) / 1e6, 2),
           "sha256": hashlib.sha256(data).hexdigest(), "history": history,
           "corpus_sha256": hashlib.sha256(pathlib.Path(args.corpus).read_bytes()).hexdigest()}
    res.update(heldout_measures(model, tok, cats))
    tn.emit(res, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
