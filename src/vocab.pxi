# vocab.pxi: part of llama2c._engine (included by _engine.pyx).
#
# The token string -> id lookup of a tokenizer, without a Python dict: a dict of a 49,152-token
# vocabulary costs about 4 MB (its table and an int object per id) next to the token strings
# themselves; this table costs 4 bytes a slot (two to four slots a token), probing by the
# strings' own hashes (cached in each str) and comparing against the tokenizer's list.

from libc.stdlib cimport malloc

cdef extern from "Python.h":
    ctypedef Py_ssize_t Py_hash_t


cdef class TokenIndex:
    """token string -> id over a list of token strings, read-only: what the dict
    {t: i for i, t in enumerate(tokens) if t is not None and (mask is None or mask[i])}
    answers (a repeated string maps to its last id), with get, [], in, len, and keys(),
    values(), items() and iteration over the distinct strings (in the order of their ids).
    `tokens` is kept, not copied: the caller does not change it."""
    cdef list _tokens
    cdef int32_t *_slots
    cdef Py_ssize_t _mask
    cdef Py_ssize_t _n

    def __cinit__(self, list tokens, mask=None):
        cdef Py_ssize_t size = 8, n = len(tokens), i, s
        if n >= (1 << 30):
            raise ValueError(f"TokenIndex: {n} tokens is too many")
        if mask is not None and len(mask) != n:
            raise ValueError(f"TokenIndex: mask has {len(mask)} entries for {n} tokens")
        while size < 2 * n:
            size *= 2
        self._slots = <int32_t *>malloc(size * sizeof(int32_t))
        if self._slots == NULL:
            raise MemoryError()
        memset(self._slots, 0xff, size * sizeof(int32_t))   # -1: empty
        self._mask = size - 1
        self._tokens = tokens
        self._n = 0
        for i in range(n):
            t = tokens[i]
            if t is None or (mask is not None and not mask[i]):
                continue
            if type(t) is not str:
                raise TypeError(f"TokenIndex: token {i} is a {type(t).__name__}, not a str")
            s = self._slot(t)
            if self._slots[s] < 0:
                self._n += 1
            self._slots[s] = <int32_t>i

    def __dealloc__(self):
        free(self._slots)

    cdef Py_ssize_t _slot(self, object key) except -1:
        """The slot holding key, or the empty slot where it would go (CPython's dict probing)."""
        cdef Py_hash_t h = hash(key)
        cdef size_t perturb = <size_t>h
        cdef size_t i = <size_t>h & <size_t>self._mask
        cdef int32_t tid
        while True:
            tid = self._slots[i]
            if tid < 0:
                return <Py_ssize_t>i
            t = self._tokens[tid]
            if t is key or t == key:
                return <Py_ssize_t>i
            perturb >>= 5
            i = (i * 5 + perturb + 1) & <size_t>self._mask

    cdef int32_t _find(self, object key) except -2:
        if type(key) is not str:
            return -1
        return self._slots[self._slot(key)]

    def get(self, key, default=None):
        cdef int32_t tid = self._find(key)
        return default if tid < 0 else tid

    def __getitem__(self, key):
        cdef int32_t tid = self._find(key)
        if tid < 0:
            raise KeyError(key)
        return tid

    def __contains__(self, key):
        return self._find(key) >= 0

    def __len__(self):
        return self._n

    def values(self):
        """The ids, one per distinct string (its last), in increasing order."""
        cdef Py_ssize_t i
        for i in range(len(self._tokens)):
            t = self._tokens[i]
            if type(t) is str and self._find(t) == i:
                yield i

    def items(self):
        for i in self.values():
            yield self._tokens[i], i

    def keys(self):
        for i in self.values():
            yield self._tokens[i]

    def __iter__(self):
        return self.keys()

    def __reduce__(self):
        return (_token_index_from, (self._tokens, list(self.values())))


def _token_index_from(tokens, ids):
    mask = bytearray(len(tokens))
    for i in ids:
        mask[i] = 1
    return TokenIndex(list(tokens), mask)
