"""Tokenizers and streaming detokenization for the serving engine.

Two tokenizers share one interface (``BaseTokenizer``):

* ``Tokenizer`` wraps a Hugging Face ``tokenizer.json`` (via the ``tokenizers`` library) plus
  ``tokenizer_config.json`` / ``chat_template.jinja`` / ``generation_config.json``.
* ``ByteTokenizer`` is the self-contained tokenizer of the tiny embedded default model: ids 0..255 are
  raw UTF-8 bytes, followed by a handful of special tokens.

Both render their chat template with serving/chat_template.py (as ``transformers`` does); the continuation of a
committed conversation is ``serving.chat_template.render_continuation``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from serving.chat_template import parse_chat_template, render_chat_template, select_template

__all__ = [
    "BaseTokenizer",
    "Tokenizer",
    "ByteTokenizer",
    "IncrementalDecoder",
    "BYTE_CHAT_TEMPLATE",
    "load_tokenizer",
]

# Named special tokens that transformers exposes to chat templates (its ``special_tokens_map``).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


class BaseTokenizer:
    """Shared interface: subclasses provide encode/decode/token_to_id and the token attributes."""

    chat_template: str | dict[str, str] | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    vocab_size: int = 0
    # Named special token strings (bos_token, eos_token, ...) visible to the chat template.
    special_tokens_map: dict[str, str] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the chat template (``chat_template`` may name one of several
        templates or give a template string). With ``tokenize=True`` return the ids, encoded without
        adding special tokens (the template writes them), as transformers does."""
        source = select_template(self.chat_template, chat_template, kwargs.get("tools"))
        text = render_chat_template(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens_map,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _token_content(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or AddedToken dicts ``{"content": ...}``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    raise ValueError(f"unsupported special token value: {value!r}")


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


class Tokenizer(BaseTokenizer):
    """A Hugging Face fast tokenizer (``tokenizer.json``) with its chat template and special tokens."""

    def __init__(
        self,
        hf_tokenizer: Any,
        *,
        chat_template: str | Mapping[str, str] | list[dict[str, str]] | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ):
        """``hf_tokenizer`` is a ``tokenizers.Tokenizer``; ``special_tokens`` maps names such as
        ``bos_token``/``eos_token``/``pad_token`` to token strings; ``extra_eos_token_ids`` are merged
        into ``eos_token_ids`` (e.g. from generation_config.json)."""
        self._tok = hf_tokenizer
        self.chat_template = parse_chat_template(chat_template)
        self.special_tokens_map = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._special_id("bos_token")
        eos = [self._special_id("eos_token"), *extra_eos_token_ids]
        # Ordered de-duplication: the config's eos token first, then generation_config's.
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos if i is not None))
        pad = self._special_id("pad_token")
        # Padding needs some id; the first eos token is the usual stand-in when none is defined.
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else None)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{name} {token!r} is not in the tokenizer vocabulary")
        return token_id

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Load from a local model directory (no downloads).

        Requires ``tokenizer.json`` and ``tokenizer_config.json``; uses ``chat_template.jinja`` over the
        config's ``chat_template`` when present, and merges ``generation_config.json``'s
        ``eos_token_id`` (int or list) into ``eos_token_ids``.
        """
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        tokenizer_file = path / "tokenizer.json"
        config_file = path / "tokenizer_config.json"
        for required in (tokenizer_file, config_file):
            if not required.is_file():
                raise FileNotFoundError(f"missing tokenizer file: {required}")

        hf = HFTokenizer.from_file(str(tokenizer_file))
        config = _read_json(config_file)

        # tokenizer.json normally lists the added tokens already; add any the config knows but it lacks.
        for entry in (config.get("added_tokens_decoder") or {}).values():
            content = _token_content(entry)
            if content is not None and hf.token_to_id(content) is None:
                special = bool(entry.get("special", True))
                token = AddedToken(content, special=special, normalized=False)
                if special:
                    hf.add_special_tokens([token])
                else:
                    hf.add_tokens([token])

        special_tokens = {name: _token_content(config.get(name)) for name in _SPECIAL_TOKEN_NAMES}

        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            chat_template: Any = template_file.read_text(encoding="utf-8")
        else:
            chat_template = config.get("chat_template")

        extra_eos: list[int] = []
        generation_file = path / "generation_config.json"
        if generation_file.is_file():
            eos = _read_json(generation_file).get("eos_token_id")
            extra_eos = [eos] if isinstance(eos, int) else list(eos or [])

        return cls(hf, chat_template=chat_template, special_tokens=special_tokens, extra_eos_token_ids=extra_eos)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def hf_tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer` inside (the grammar engine reads its vocabulary)."""
        return self._tok


# Compact on purpose (the tiny model has a small context): no newlines, one token per role marker.
# Content may be a string or a list of OpenAI-style parts, of which the text parts are used.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' ~ message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is defined %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ByteTokenizer(BaseTokenizer):
    """Byte-level tokenizer of the embedded default model.

    Ids 0..255 are UTF-8 bytes; then ``<pad>``=256, ``<bos>``=257, ``<eos>``=258, ``<|user|>``=259,
    ``<|assistant|>``=260, ``<|system|>``=261, ``<|end|>``=262; id 263 is a spare (decodes to "").
    Special-token strings inside text are encoded as their ids (like added tokens in HF tokenizers).
    """

    SPECIAL_TOKENS = {
        "<pad>": 256,
        "<bos>": 257,
        "<eos>": 258,
        "<|user|>": 259,
        "<|assistant|>": 260,
        "<|system|>": 261,
        "<|end|>": 262,
    }
    VOCAB_SIZE = 264

    def __init__(self) -> None:
        self.vocab_size = self.VOCAB_SIZE
        self.chat_template = BYTE_CHAT_TEMPLATE
        self.special_tokens_map = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
        self.pad_token_id = self.SPECIAL_TOKENS["<pad>"]
        self.bos_token_id = self.SPECIAL_TOKENS["<bos>"]
        # A chat turn ends with <|end|>; <eos> ends raw (non-chat) text.
        self.eos_token_ids = (self.SPECIAL_TOKENS["<|end|>"], self.SPECIAL_TOKENS["<eos>"])
        self._id_to_special = {i: s for s, i in self.SPECIAL_TOKENS.items()}
        # Capturing group so re.split keeps the special tokens; longest first so no token shadows another.
        alternatives = sorted(self.SPECIAL_TOKENS, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens else []
        for i, piece in enumerate(self._special_re.split(text)):
            # re.split with one group alternates: text, special, text, special, ...
            if i % 2:
                ids.append(self.SPECIAL_TOKENS[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
            elif not skip_special_tokens and i in self._id_to_special:
                # Bytes are decoded per run so a multi-byte character is only whole within one run.
                parts.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                parts.append(self._id_to_special[i])
            # Skipped specials, the spare id and out-of-range ids are invisible (and do not split runs).
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if token in self.SPECIAL_TOKENS:
            return self.SPECIAL_TOKENS[token]
        raw = token.encode("utf-8")
        return raw[0] if len(raw) == 1 else None


def load_tokenizer(path: str | Path | None) -> BaseTokenizer:
    """``ByteTokenizer()`` for None or for a directory whose ``byte_tokenizer.json`` is
    ``{"type": "byte"}``; otherwise ``Tokenizer.from_pretrained(path)``."""
    if path is None:
        return ByteTokenizer()
    path = Path(path)
    marker = path / "byte_tokenizer.json"
    if marker.is_file():
        kind = _read_json(marker).get("type")
        if kind != "byte":
            raise ValueError(f"{marker}: unsupported tokenizer type {kind!r}")
        return ByteTokenizer()
    return Tokenizer.from_pretrained(path)


# --------------------------------------------------------------------------------------------------
# Streaming detokenization
# --------------------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas for streaming responses.

    Decoding single tokens is wrong in two ways: a multi-byte UTF-8 character can be split across byte
    tokens (decoding half of it yields U+FFFD), and some decoders depend on context (e.g. leading-space
    handling). So each step decodes a small window ``ids[prefix:]`` and emits only what it adds beyond
    ``ids[prefix:read]``; while the window's text ends in U+FFFD the character is assumed incomplete and
    held back. ``read`` only advances to a point right after a complete character, where UTF-8 decoding
    restarts cleanly, so the concatenated deltas plus ``flush()`` equal ``decode(all ids)``.
    """

    def __init__(self, tokenizer: BaseTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: context for decoders that look at the previous token
        self._read = 0  # ids before this have been emitted
        self._emitted: list[str] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def feed(self, token_id: int) -> str:
        """Add one token id; return the newly completed text (possibly "")."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            self._emitted.append(delta)
            return delta
        return ""

    def feed_many(self, token_ids: Iterable[int]) -> str:
        """Feed several ids; return the concatenated deltas."""
        return "".join(self.feed(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: return whatever was held back (an incomplete character becomes U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        delta = new_text[len(prefix_text) :]
        self._prefix = self._read = len(self.ids)
        if delta:
            self._emitted.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._emitted)
