"""The llguidance view of the engine's tokenizer: an `LLTokenizer` over exactly the model's vocabulary size V.

Masks are V bits wide, so the LLTokenizer must have V tokens: ids the tokenizer lacks (the model's padding rows)
are added as special tokens no grammar names, hence never allowed.
"""
from __future__ import annotations

from typing import Any, Iterable

import llguidance

from serving.tokenizer import ByteTokenizer


class _ByteVocab:
    """The byte tokenizer in the shape `llguidance.TokenizerWrapper` reads: ids 0..255 are the bytes, the rest
    special tokens (named by the tokenizer, or ``<|unused_<id>|>``)."""

    def __init__(self, tokenizer: ByteTokenizer, vocab_size: int, eos_ids: list[int]):
        names = {i: s for s, i in tokenizer.SPECIAL_TOKENS.items()}
        self.tokens = [bytes([i]) for i in range(256)]
        self.tokens += [names.get(i, f"<|unused_{i}|>").encode() for i in range(256, vocab_size)]
        self.special_token_ids = list(range(256, vocab_size))
        self.eos_token_id = eos_ids[0] if eos_ids else None
        self.bos_token_id = tokenizer.bos_token_id

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)


def hf_tokenizer(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` inside a `serving.tokenizer.Tokenizer`."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is None or not hasattr(hf, "to_str"):
        raise TypeError(f"no Hugging Face tokenizer inside {type(tokenizer).__name__}")
    return hf


def _hf_json(hf: Any) -> str:
    """tokenizer.json text without padding/truncation (they would change how llguidance tokenizes)."""
    from tokenizers import Tokenizer as HFTokenizer

    copy = HFTokenizer.from_str(hf.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy.to_str()


def ll_tokenizer(tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]) -> llguidance.LLTokenizer:
    """An LLTokenizer of `vocab_size` tokens for a ByteTokenizer or a Hugging Face based Tokenizer, whose end of
    sequence tokens are `stop_ids` (the tokens a complete output may end with)."""
    stops = list(dict.fromkeys(int(i) for i in stop_ids))
    if not stops:
        raise ValueError("the grammar engine needs at least one stop (eos) token id")
    if any(not 0 <= i < vocab_size for i in stops):
        raise ValueError(f"stop token ids {stops} must lie in [0, {vocab_size})")
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocabulary ({vocab_size}) smaller than the tokenizer's ({tokenizer.vocab_size})")
    if isinstance(tokenizer, ByteTokenizer):
        vocab = llguidance.TokenizerWrapper(_ByteVocab(tokenizer, vocab_size, stops))
        ll = llguidance.LLTokenizer(vocab, eos_token=stops)
    else:
        ll = llguidance.LLTokenizer(_hf_json(hf_tokenizer(tokenizer)), n_vocab=vocab_size, eos_token=stops)
    if ll.vocab_size != vocab_size:
        raise ValueError(f"llguidance built a vocabulary of {ll.vocab_size} tokens, expected {vocab_size}")
    return ll


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's special-token strings -> ids (a delimiter spelling one must be that token)."""
    if isinstance(tokenizer, ByteTokenizer):
        return dict(tokenizer.SPECIAL_TOKENS)
    try:
        added = hf_tokenizer(tokenizer).get_added_tokens_decoder()
    except TypeError:
        return {}
    return {t.content: i for i, t in added.items() if t.special}
