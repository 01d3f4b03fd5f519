"""Keeping a long chat inside the model's context: the oldest turns are left out."""

from __future__ import annotations


def fit_messages(model, messages: list[dict], max_tokens: int) -> tuple[list[dict], int]:
    """`messages` without their oldest turns (never the system prompt nor the last message)
    until the prompt leaves room for a reply of min(max_tokens, a quarter of the context).
    Returns the messages kept and how many were left out."""
    room = min(max_tokens, model.n_ctx // 4)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while len(turns) > 1 and (len(model.chat_prompt(system + turns)) + room > model.n_ctx
                              or turns[0]["role"] != "user"):  # templates start with a user turn
        turns = turns[1:]
        dropped += 1
    return system + turns, dropped
