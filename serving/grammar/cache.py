"""The compiled-grammar cache: least recently used first out, bounded by the grammars' estimated bytes."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable

from serving.grammar.limits import release_free_memory

_TRIM_BYTES = 16 << 20  # evicting at least this much gives the freed pages back to the system


class GrammarCache:
    """Maps a spec to its compiled grammar (anything with an ``nbytes`` estimate); thread-safe.

    The sum of ``nbytes`` stays within `budget`: an insert evicts the least recently used entries first, and an
    entry larger than the whole budget is not kept. Evicted grammars live on as long as requests use them."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Estimated bytes of the cached grammars."""
        return self._bytes

    def get(self, key: Hashable) -> Any | None:
        """The cached grammar of `key` (now the most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> Any:
        """Cache `value` under `key` unless another is already there (that one is returned and kept); returns
        the grammar to use."""
        evicted = 0
        with self._lock:
            current = self._entries.get(key)
            if current is not None:
                self._entries.move_to_end(key)
                return current
            if value.nbytes > self.budget:
                return value
            self._entries[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.budget:
                size = self._entries.popitem(last=False)[1].nbytes  # no reference kept: freed unless in use
                self._bytes -= size
                evicted += size
        if evicted >= _TRIM_BYTES:
            release_free_memory()
        return value

    def clear(self) -> None:
        """Drop every grammar."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
