"""The stateful shell around hybrid_jax: engine, conversation ledger, OpenAI server, batch job."""
from serving.engine import ChatResult, Engine, RequestHandle, SamplingParams, StreamDelta, TokenLogprob
from serving.errors import BadRequest, ConversationBusy, EngineError, NotFound, Overloaded, PromptTooLong

__all__ = ["BadRequest", "ChatResult", "ConversationBusy", "Engine", "EngineError", "NotFound", "Overloaded",
           "PromptTooLong", "RequestHandle", "SamplingParams", "StreamDelta", "TokenLogprob"]
