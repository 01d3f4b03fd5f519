"""Per-chat settings: the system prompt, the sampling parameters of every reply, and how
replies decode (plainly, or speculatively with a draft model or prompt lookup)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from diptych.errors import InvalidArgumentError, SamplingError
from diptych.inference.sampling import DEFAULT_MAX_TOKENS, SamplingParams

_NUMBER, _INT = (int, float, type(None)), (int, type(None))
_KINDS = {  # the JSON types each stored setting may have (null: the model's default)
    "system": (str,), "temperature": _NUMBER, "top_p": _NUMBER, "top_k": _INT,
    "min_p": _NUMBER, "repetition_penalty": _NUMBER, "max_tokens": (int,),
    "seed": _INT, "speculative": (str, type(None)), "draft": (str, type(None)),
    "draft_max": _INT, "lookup_ngram": _INT}
SPECULATIVE = (None, "lookup", "draft")  # plain decoding, prompt lookup, a draft model


def _is(value, kinds: tuple) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)


@dataclass
class ChatSettings:
    """A sampling value of None is the loaded model's default (`Model.sampling`)."""

    system: str = ""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int | None = None
    speculative: str | None = None  # one of SPECULATIVE
    draft: str | None = None        # the draft model's path, for speculative="draft"
    draft_max: int | None = None    # most tokens drafted per pass (None: as many as the model
                                    # was loaded to roll back)
    lookup_ngram: int | None = None  # prompt lookup matches the last n tokens, then fewer
                                     # (None: Model.stream's default)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ChatSettings:
        """Known keys only, so settings saved by another version still load."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> tuple[ChatSettings, list[str]]:
        """Settings as stored (a JSON object); what cannot be read is left at its default
        and described in the returned list."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError):
            return cls(), ["not valid JSON"]
        if not isinstance(data, dict):
            return cls(), [f"a JSON {type(data).__name__} instead of an object"]
        good = {k: v for k, v in data.items() if k in _KINDS and _is(v, _KINDS[k])
                and (k != "speculative" or v in SPECULATIVE)}
        wrong = [f"{k}={v!r}" for k, v in data.items() if k in _KINDS and k not in good]
        return cls.from_dict(good), wrong

    def validate(self) -> None:
        """Raise SamplingError or InvalidArgumentError (DiptychErrors) for an out-of-range
        value."""
        kw = self.generation_kwargs()
        for name in ("max_tokens", "draft_max", "lookup_ngram"):
            value = kw.pop(name, None)
            if (value is not None or name == "max_tokens") and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SamplingError(f"{name} must be a positive integer, got {value!r}")
        if kw.pop("speculative") not in SPECULATIVE:
            raise InvalidArgumentError(f"speculative must be one of {SPECULATIVE}, got "
                                       f"{self.speculative!r}")
        if self.speculative == "draft" and not self.draft:
            raise InvalidArgumentError("speculative decoding with a draft model needs a "
                                       "draft model: choose one")
        SamplingParams().with_overrides(**kw)

    def generation_kwargs(self) -> dict:
        """Keyword arguments for `Model.stream` (the draft model itself is the loaded
        model's: see `ChatScreen`)."""
        kw = asdict(self)
        del kw["system"], kw["draft"]
        if kw["lookup_ngram"] is None:
            del kw["lookup_ngram"]
        return kw

    def messages(self, history: list[dict]) -> list[dict]:
        """The message list a reply is generated from: the system prompt, then the chat."""
        system = [{"role": "system", "content": self.system}] if self.system.strip() else []
        return system + [{"role": m["role"], "content": m["content"]} for m in history]
