"""The embedded default model, asked the README's example questions at its default
settings (no sampling keyword given), answers on topic and stops on its own."""

import pytest

# (question, words of which an on-topic answer holds one, seeds, answers that must hold one)
QUESTIONS = [("What is the capital of France?", ("Paris",), 5, 4),
             ("Say hello.", ("Hello", "Hi"), 2, 2),
             ("Write a haiku about the sea.", ("sea", "ocean", "wave"), 2, 2)]


@pytest.mark.parametrize("question,words,seeds,needed", QUESTIONS)
def test_default_settings_answer_on_topic_and_stop(smollm2, question, words, seeds, needed):
    if smollm2.sampling.greedy:  # the seed changes nothing: one answer is every answer
        seeds, needed = 1, 1
    answers = []
    for seed in range(seeds):
        pieces = list(smollm2.chat_stream([{"role": "user", "content": question}],
                                          max_tokens=256, seed=seed))
        text = "".join(p.text for p in pieces)
        assert pieces[-1].finish_reason == "stop", (seed, text)
        assert pieces[-1].token_ids[0] in smollm2.tokenizer.eog_ids, (seed, text)
        answers.append(text.lower())
    assert sum(any(w.lower() in a for w in words) for a in answers) >= needed, answers
