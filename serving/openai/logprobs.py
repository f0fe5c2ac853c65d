"""Logprobs in OpenAI's shapes: chat (`{"token", "logprob", "bytes", "top_logprobs"}` per token, also the
Responses API's) and completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""
from __future__ import annotations


def _top_entries(tl) -> list[tuple[int | None, str | None, float]]:
    """The alternatives of a TokenLogprob as (id, text, logprob), whatever shape the engine uses."""
    top = getattr(tl, "top", None)
    if top is None:
        top = getattr(tl, "top_logprobs", None)
    out = []
    if isinstance(top, dict):
        top = list(top.items())
    for e in top or []:
        if isinstance(e, (tuple, list)):
            if len(e) == 3:
                out.append((e[0], e[1], float(e[2])))
            elif len(e) == 2:
                a, b = e
                out.append((a, None, float(b)) if isinstance(a, int) else (None, str(a), float(b)))
        else:
            out.append((getattr(e, "token_id", None), getattr(e, "token", None), float(getattr(e, "logprob"))))
    return out


class LogprobFormatter:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.byte_level = type(tokenizer).__name__ == "ByteTokenizer"

    def text(self, tid: int | None, text: str | None) -> str:
        if text is not None:
            return text
        if tid is None:
            return ""
        return self.tok.decode([int(tid)], skip_special_tokens=False)

    def bytes(self, tid: int | None, text: str) -> list[int]:
        if self.byte_level and tid is not None and 0 <= int(tid) < 256:
            return [int(tid)]
        return list(text.encode("utf-8", errors="replace"))

    def chat(self, tls) -> list[dict]:
        out = []
        for tl in tls:
            tid = getattr(tl, "token_id", None)
            s = self.text(tid, getattr(tl, "token", None))
            tops = []
            for a, b, lp in _top_entries(tl):
                t = self.text(a, b)
                tops.append({"token": t, "logprob": lp, "bytes": self.bytes(a, t)})
            out.append({"token": s, "logprob": float(tl.logprob), "bytes": self.bytes(tid, s), "top_logprobs": tops})
        return out

    def completion(self, tls, offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for tl in tls:
            s = self.text(getattr(tl, "token_id", None), getattr(tl, "token", None))
            tokens.append(s)
            lps.append(float(tl.logprob))
            tops.append({self.text(a, b): lp for a, b, lp in _top_entries(tl)})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

