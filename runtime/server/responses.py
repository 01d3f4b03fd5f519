"""OpenAI's response shapes: whole responses, stream chunks as server-sent events, usage and
logprobs, for chat (`chat.completion`) and text (`text_completion`) alike."""

from __future__ import annotations

import json
import secrets
import time

from diptych.inference.generate import TokenLogprob

DONE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class Envelope:
    """The fields every response or chunk of one request shares."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model

    def _wrap(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, text: str | None, finish_reason: str, usage_: dict, logprobs=None,
              tool_calls: list | None = None) -> dict:
        if not self.chat:
            return self._wrap("text_completion", [{"index": 0, "text": text,
                                                   "logprobs": logprobs,
                                                   "finish_reason": finish_reason}],
                              usage=usage_)
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return self._wrap("chat.completion", [{"index": 0, "message": message,
                                               "logprobs": logprobs,
                                               "finish_reason": finish_reason}], usage=usage_)

    def chunk(self, delta: dict, finish_reason: str | None = None, logprobs=None,
              with_usage: bool = False) -> bytes:
        """One stream chunk: for chat, `delta` is the message delta; for text, {"text": ...}."""
        choice = ({"index": 0, "delta": delta} if self.chat else {"index": 0, **delta})
        choice.update(logprobs=logprobs, finish_reason=finish_reason)
        extra = {"usage": None} if with_usage else {}
        return sse(self._wrap(self._chunk_object, [choice], **extra))

    def usage_chunk(self, usage_: dict) -> bytes:
        """The last chunk when the client asked for usage: no choices."""
        return sse(self._wrap(self._chunk_object, [], usage=usage_))

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def _token(tokenizer, token_id: int, logprob: float) -> dict:
    raw = tokenizer.token_bytes(token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
            "bytes": list(raw)}


def chat_logprobs(tokenizer, lps: list[TokenLogprob]) -> dict:
    return {"content": [dict(_token(tokenizer, t.token_id, t.logprob),
                             top_logprobs=[_token(tokenizer, i, v) for i, v in t.top])
                        for t in lps],
            "refusal": None}


def text_logprobs(tokenizer, lps: list[TokenLogprob], offset: int = 0) -> dict:
    """The legacy completions shape; `offset` is where the first token's text starts."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in lps:
        text = _token(tokenizer, t.token_id, t.logprob)["token"]
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({_token(tokenizer, i, v)["token"]: v for i, v in t.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
