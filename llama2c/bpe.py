"""BPE merging shared by both tokenizer kinds.

Sentencepiece-style vocabularies (llama2.c tokenizer.bin, GGUF 'llama') merge the adjacent
pair whose concatenation is the vocabulary entry with the highest score; Hugging Face and
GGUF 'gpt2' vocabularies merge the pair with the lowest rank in the merges list. Both are
the same loop with a different pair cost, run here with a heap over a linked list of
symbols: O(n log n) instead of llama2.c's rescan of every pair after each merge.
"""
from __future__ import annotations

import heapq
from array import array
from typing import Callable, Optional

PairCost = Callable[[str, str], Optional[float]]

# Words longer than this are not cached (a sentencepiece "word" is the whole text).
_CACHE_MAX_WORD = 64
_CACHE_MAX_ENTRIES = 100_000


def merge_symbols(symbols: list, pair_cost: PairCost) -> list:
    """Repeatedly merge the adjacent pair of lowest cost (leftmost on ties); return the result.

    pair_cost(left, right) gives the cost of merging two symbols, or None if they can't merge.
    """
    n = len(symbols)
    if n < 2:
        return list(symbols)
    syms = list(symbols)
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1

    heap = []

    def push(i: int, j: int) -> None:
        cost = pair_cost(syms[i], syms[j])
        if cost is not None:
            heapq.heappush(heap, (cost, i, syms[i], syms[j]))

    for i in range(n - 1):
        cost = pair_cost(syms[i], syms[i + 1])
        if cost is not None:
            heap.append((cost, i, syms[i], syms[i + 1]))
    heapq.heapify(heap)

    while heap:
        _, i, left, right = heapq.heappop(heap)
        j = nxt[i]
        # Symbols only grow, so an entry is stale exactly when either side has changed
        # (a merged-away symbol is None).
        if j == -1 or syms[i] != left or syms[j] != right:
            continue
        syms[i] = left + right
        syms[j] = None
        nxt[i] = nxt[j]
        if nxt[i] != -1:
            prev[nxt[i]] = i
        if prev[i] != -1:
            push(prev[i], i)
        if nxt[i] != -1:
            push(i, nxt[i])

    out, i = [], 0
    while i != -1:
        out.append(syms[i])
        i = nxt[i]
    return out


def score_cost(pieces: dict, scores: list) -> PairCost:
    """Sentencepiece cost: minus the score of the merged piece, if it is in the vocabulary."""
    def cost(left: str, right: str):
        token_id = pieces.get(left + right)
        return None if token_id is None else -scores[token_id]
    return cost


def rank_cost(ranks: dict) -> PairCost:
    """Merges-list cost: the rank of the (left, right) merge rule."""
    return lambda left, right: ranks.get((left, right))


def merge_rank_cost(pairs, pieces: dict) -> PairCost:
    """rank_cost of the merge rules `pairs` ((left, right) in rank order; the first rank of a
    repeated pair counts), stored compactly: a rule whose result left + right is a vocabulary
    entry (every rule of a trained BPE) is kept by that entry's id, as its rank and the length
    of its left part (two int32 arrays over the vocabulary), so that no (left, right) tuple
    or split string is kept; the rare others (a result outside the vocabulary, or a second
    split of the same result) go to a dict. Same costs as rank_cost({pair: rank}), in about
    1 MB instead of 15 MB for a 49k-token vocabulary with 48,900 merges."""
    size = max(pieces.values(), default=-1) + 1
    rank = array("i", [-1]) * size        # token id -> rank of the rule producing it, or -1
    split = array("i", [0]) * size        # token id -> length of that rule's left part
    others = {}                            # (left, right) -> rank, for the rest
    for r, (left, right) in enumerate(pairs):
        token_id = pieces.get(left + right)
        if token_id is not None and rank[token_id] < 0:
            rank[token_id], split[token_id] = r, len(left)
        elif token_id is None or split[token_id] != len(left):
            others.setdefault((left, right), r)
    get = pieces.get

    def cost(left: str, right: str):
        token_id = get(left + right)
        if token_id is not None and split[token_id] == len(left) and rank[token_id] >= 0:
            return rank[token_id]
        return others.get((left, right)) if others else None
    return cost


class WordEncoder:
    """Turn one pre-tokenized word into token ids.

    pieces: symbol string -> id for the entries merging may produce (and single characters);
    characters not in it become `<0xXX>` byte tokens (byte_fallback) or unk_id. Those never
    merge with their neighbours, so the word is merged run by run between them.
    """

    def __init__(self, pieces: dict, pair_cost: PairCost, *, byte_ids: Optional[list] = None,
                 unk_id: Optional[int] = None, fuse_unk: bool = False,
                 ignore_merges: bool = False):
        self.pieces = pieces
        self.pair_cost = pair_cost
        self.byte_ids = byte_ids        # byte value -> id of "<0xXX>" (or unk / None)
        self.unk_id = unk_id
        self.fuse_unk = fuse_unk
        self.ignore_merges = ignore_merges
        self._cache = {}

    def encode(self, word: str) -> list:
        if self.ignore_merges and word in self.pieces:
            return [self.pieces[word]]
        cached = self._cache.get(word)
        if cached is not None:
            return list(cached)
        ids = self._encode_uncached(word)
        if len(word) <= _CACHE_MAX_WORD:
            if len(self._cache) >= _CACHE_MAX_ENTRIES:
                self._cache.clear()
            self._cache[word] = tuple(ids)
        return ids

    def _encode_uncached(self, word: str) -> list:
        ids, run = [], []
        for ch in word:
            if ch in self.pieces:
                run.append(ch)
                continue
            ids += self._merge_run(run)
            run = []
            ids += self._fallback(ch, ids)
        ids += self._merge_run(run)
        return ids

    def _merge_run(self, run: list) -> list:
        out = []
        for symbol in merge_symbols(run, self.pair_cost):
            token_id = self.pieces.get(symbol, self.unk_id)
            if token_id is not None:
                out.append(token_id)
        return out

    def _fallback(self, ch: str, emitted: list) -> list:
        """Ids for a character the vocabulary lacks: its UTF-8 bytes, else unk (or nothing)."""
        if self.byte_ids is not None:
            ids = (self.byte_ids[b] for b in ch.encode("utf-8"))
            return [i for i in ids if i is not None]
        if self.unk_id is None:
            return []
        if self.fuse_unk and emitted and emitted[-1] == self.unk_id:
            return []
        return [self.unk_id]
