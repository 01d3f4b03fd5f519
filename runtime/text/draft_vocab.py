"""Whether a draft model's tokenizer is the target's.

Speculative decoding hands the draft's token ids to the target as they are, so the two must
share a tokenizer: same kind, same special tokens, the same text for every id both have.
Vocabularies may differ in padding only (ids past the shorter one that are unused or control
tokens, as model makers pad the embedding table).
"""

from __future__ import annotations

from diptych.errors import IncompatibleDraftError

UNUSED_KINDS = (3, 5)   # control, unused: what padding ids are typed as


def check_compatible(target, draft) -> None:
    """IncompatibleDraftError naming the first difference between two Tokenizers."""
    def fail(what: str) -> None:
        raise IncompatibleDraftError(f"the draft model cannot draft for this target: {what}")

    if target.kind != draft.kind:
        fail(f"tokenizer kind {draft.kind!r} differs from the target's {target.kind!r}")
    for name in ("bos_id", "eos_id", "eot_id", "eom_id", "pad_id", "unk_id", "eog_ids"):
        a, b = getattr(target, name), getattr(draft, name)
        if a != b:
            fail(f"special token {name} is {_show(b)} in the draft and {_show(a)} in the "
                 f"target")
    shared = min(target.vocab_size, draft.vocab_size)
    for i in range(shared):
        if target.id_to_token(i) != draft.id_to_token(i):
            fail(f"token {i} is {draft.id_to_token(i)!r} in the draft and "
                 f"{target.id_to_token(i)!r} in the target")
    longer, name = (target, "target") if target.vocab_size > shared else (draft, "draft")
    for i in range(shared, longer.vocab_size):
        if longer.token_type(i) not in UNUSED_KINDS:
            fail(f"the {name}'s vocabulary has {longer.vocab_size} tokens, the other's "
                 f"{shared}, and its token {i} ({longer.id_to_token(i)!r}) is not padding")


def _show(value) -> str:
    return str(sorted(value)) if isinstance(value, frozenset) else str(value)
