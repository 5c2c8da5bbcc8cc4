"""Teacher-forced scoring under the current profile: next-token distributions, log
probabilities of given continuations, and the KL divergence between two conditions.

Every function prefills many sequences per llama.cpp batch (SteeredLlama.trace_many) and
asks only for the rows it needs, in chunks small enough that a large vocabulary's logits
stay in memory."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ..errors import SteerError

# logits held at once: rows x n_vocab floats (4096 x 150k x 4 B = 2.4 GB would be too much)
_MAX_LOGIT_FLOATS = 64 * 1024 * 1024


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def _chunks(llm, seqs: Sequence[Sequence[int]], rows: Sequence[Sequence[int]],
            batch_tokens: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(first sequence index, logits per sequence) for consecutive groups of sequences."""
    limit = max(1, _MAX_LOGIT_FLOATS // max(1, llm.n_vocab()))
    start = 0
    while start < len(seqs):
        stop, n_rows = start, 0
        while stop < len(seqs) and (stop == start or n_rows + len(rows[stop]) <= limit):
            n_rows += len(rows[stop])
            stop += 1
        yield start, llm.trace_many(seqs[start:stop], rows[start:stop], batch_tokens=batch_tokens, logits=True)
        start = stop


def _check(llm, seqs: Sequence[Sequence[int]]) -> None:
    n_vocab = llm.n_vocab()
    for i, s in enumerate(seqs):
        if len(s) < 2:
            raise SteerError(f"sequence {i}: scoring needs at least 2 tokens, got {len(s)}")
        if min(s) < 0 or max(s) >= n_vocab:
            raise SteerError(f"sequence {i}: token id out of range (vocabulary has {n_vocab} tokens)")


def next_token_logprobs(llm, seqs: Sequence[Sequence[int]], batch_tokens: int = 1024) -> Iterator[np.ndarray]:
    """For each sequence, float64 [len - 1, n_vocab]: the log-distribution of every next
    token (row t predicts token t + 1), under llm's current profile. A generator, so only a
    chunk of sequences is held at once."""
    _check(llm, seqs)
    rows = [list(range(len(s) - 1)) for s in seqs]
    for _, logits in _chunks(llm, seqs, rows, batch_tokens):
        for m in logits:
            yield log_softmax(m)


def continuation_logprob(llm, seqs: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                         batch_tokens: int = 1024) -> np.ndarray:
    """float64 [len(seqs)]: log P(seq[a:b] | seq[:a]) for each sequence and its span (a, b),
    teacher-forced, under llm's current profile. a >= 1: the first token has no prediction."""
    _check(llm, seqs)
    rows = []
    for i, (s, (a, b)) in enumerate(zip(seqs, spans)):
        if not 1 <= a < b <= len(s):
            raise SteerError(f"sequence {i}: span ({a}, {b}) must satisfy 1 <= a < b <= {len(s)}")
        rows.append(list(range(a - 1, b - 1)))
    out = np.zeros(len(seqs), dtype=np.float64)
    for start, logits in _chunks(llm, seqs, rows, batch_tokens):
        for j, m in enumerate(logits):
            i = start + j
            a, b = spans[i]
            lp = log_softmax(m)
            out[i] = float(lp[np.arange(b - a), np.asarray(seqs[i][a:b], dtype=np.int64)].sum())
    return out


def kl_divergence(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, from log-probabilities [rows, n_vocab]."""
    p = np.exp(p_log)
    return np.maximum((p * (p_log - q_log)).sum(axis=-1), 0.0)


def token_nll(logprobs: np.ndarray, seq: Sequence[int]) -> np.ndarray:
    """-log P of each actual next token, from next_token_logprobs' rows for that sequence."""
    return -logprobs[np.arange(len(seq) - 1), np.asarray(seq[1:], dtype=np.int64)]
