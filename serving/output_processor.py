"""Output processing: one sampled token at a time -> detokenized text, stop checks, logprobs, stream deltas.

Holds back from the stream any tail of the text that could still grow into a stop string. Decides when a
request finishes (stop token, stop string, max_tokens, max_model_len) and with which reason; the engine acts on
it (commit and close).
"""
from __future__ import annotations

from serving.request import Request, StreamDelta, TokenLogprob


class OutputProcessor:
    def __init__(self, tokenizer, eos_ids: set[int], max_model_len: int):
        self.tokenizer, self.eos, self.max_model_len = tokenizer, set(eos_ids), max_model_len

    def stop_ids(self, r: Request) -> set[int]:
        return (set() if r.sp.ignore_eos else self.eos) | set(r.sp.stop_token_ids)

    def at_length(self, r: Request, tokens: int) -> bool:
        """Whether a request holding `tokens` generated tokens has reached max_tokens or max_model_len."""
        return tokens >= r.sp.max_tokens or len(r.prompt_ids) + tokens >= self.max_model_len

    def emit(self, r: Request, t: int, lp: float, top_ids, top_lp) -> str | None:
        """Account one sampled token and stream what is safe to show. Returns the finish reason or None."""
        r.generated.append(t)
        sp = r.sp
        stop_tok = t in self.stop_ids(r)
        r.raw += "" if stop_tok else r.decoder.feed(t)
        reason, end = None, None
        cut = _find_stop(r.raw, sp.stop, since=len(r.text))
        if stop_tok or cut is not None:
            reason, end = "stop", cut
        elif self.at_length(r, len(r.generated)):
            reason = "length"
        if reason is not None and end is None:
            r.raw += r.decoder.flush()  # complete any held-back partial character
            end = len(r.raw)
        elif reason is None:
            end = len(r.raw) - _stop_prefix_len(r.raw, sp.stop)
        delta = r.raw[len(r.text):end]
        r.text += delta
        lps = None
        if r.logprobs is not None:
            lps = [self._logprob(r, t, lp, top_ids, top_lp)]
            r.logprobs.extend(lps)
        if delta or not stop_tok:
            r.out.put(StreamDelta(delta, [t], lps))
        return reason

    def _logprob(self, r: Request, t: int, lp: float, top_ids, top_lp) -> TokenLogprob:
        dec = lambda i: self.tokenizer.decode([int(i)], skip_special_tokens=False)
        top = [(int(a), dec(a), float(b)) for a, b in list(zip(top_ids, top_lp))[:r.sp.top_logprobs]]
        return TokenLogprob(t, dec(t), float(lp), top)

    def committed_body(self, r: Request) -> list[int]:
        """The generated ids a finished turn commits: a final stop token was never fed to the model (the
        template's own closing of the message replaces it in the next turn, as a full re-render would)."""
        g = r.generated
        return g[:-1] if g and g[-1] in self.stop_ids(r) else list(g)


def _find_stop(raw: str, stops, since: int) -> int | None:
    """Where the earliest stop string starts in raw[since:] (the text not yet streamed); None if none."""
    best = None
    for st in stops:
        i = raw.find(st, since)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _stop_prefix_len(raw: str, stops) -> int:
    """Length of the longest tail of raw that could still grow into a stop string (held back from the stream)."""
    best = 0
    for st in stops:
        for k in range(min(len(st) - 1, len(raw)), best, -1):
            if raw.endswith(st[:k]):
                best = k
                break
    return best
