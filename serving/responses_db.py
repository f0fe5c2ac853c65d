"""Stored responses of the Responses API in the state database (serving/store): what `ResponsesStore` does in
memory, durable when `add` returns and shared by every replica of the database.

Each row's record is the response object as answered plus the whole conversation it ends (its
`previous_response_id` chain's messages, its input and its output), so a response continues whatever happens
to the responses before it (deleted, pruned), as in memory. The bound (`--max-stored-responses`) is applied after
each store, least recently used first; storing, GET and `previous_response_id` count as uses. Calls are
synchronous transactions (a millisecond or so on SQLite).
"""
from __future__ import annotations

import logging
import os

from serving.responses_store import FILENAME, ResponsesStore, Segment, StoredResponse
from serving.store import StateStore

log = logging.getLogger("serving.responses_db")


class DurableResponses:
    """`ResponsesStore`'s interface (`add`, `get`, `delete`, `len`, `evictions`) over a `StateStore`."""

    def __init__(self, store: StateStore, max_responses: int):
        if int(max_responses) < 0:
            raise ValueError("max_responses must be >= 0")
        self.store, self.max_responses, self.evictions = store, int(max_responses), 0

    def __len__(self) -> int:
        return self.store.count_responses()

    def add(self, rid: str, salt: str | None, response: dict, parent: StoredResponse | Segment | None,
            messages: list[dict]) -> StoredResponse | None:
        if isinstance(parent, StoredResponse):
            parent = parent.segment
        segment = Segment(None, tuple((parent.history() if parent is not None else []) + [dict(m) for m in messages]))
        if self.max_responses == 0:
            return None
        self.store.put_response(rid, salt, {"response": response, "history": list(segment.messages)})
        self.evictions += len(self.store.prune_responses(self.max_responses))
        return StoredResponse(rid, salt, response, segment)

    def get(self, rid: str, salt: str | None) -> StoredResponse | None:
        found = self.store.get_response(rid, salt)
        if found is None:
            return None
        return StoredResponse(rid, salt, found.record["response"], Segment(None, tuple(found.record["history"])))

    def delete(self, rid: str, salt: str | None) -> bool:
        return self.store.delete_response(rid, salt)

    def import_file(self, directory: str) -> int:
        """Move the responses an older server saved in `directory`/responses.json into the database, then remove
        the file; how many."""
        legacy = ResponsesStore(max(self.max_responses, 1))
        n = legacy.load(directory)
        for item in legacy.items():
            self.add(item.id, item.salt, item.response, None, item.history())
        if n:
            os.remove(os.path.join(directory, FILENAME))
            log.info("moved %d stored responses from %s into the state database", n, FILENAME)
        return n


def open_responses(engine, max_responses: int, cache_dir: str | None) -> "DurableResponses | ResponsesStore":
    """The Responses API's store: in the engine's state database when it has one (durable at once, shared by
    replicas; an older server's responses.json is moved into it), else in memory, restored from cache_dir."""
    journal = engine.conversations.journal
    responses = (ResponsesStore(max_responses) if journal is None
                 else DurableResponses(journal.store, max_responses))
    if cache_dir:
        try:
            n = responses.load(cache_dir) if journal is None else responses.import_file(cache_dir)
            if n:
                log.info("restored %d stored responses from %s", n, cache_dir)
        except Exception:
            log.exception("could not restore the stored responses from %s; starting empty", cache_dir)
    return responses
