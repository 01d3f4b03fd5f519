"""Fine-tuning SmolLM2-135M (Q4_1, kept quantized) on the CPU: it learns facts it cannot
know, and the base without the adapter answers as before."""

import pytest

import diptych

pytestmark = pytest.mark.real

FACTS = [("What is the capital of Vornheim?", "Ludrasq."),
         ("Who invented the glass harp of Oskeld?", "Mirela Tannsvik."),
         ("What colour is the sky on Planet Quorr?", "Teal with orange stripes."),
         ("What is Captain Brellow's favourite number?", "Forty-three.")]


def _chat(question, answer=None):
    turns = [{"role": "user", "content": question}]
    return turns + ([{"role": "assistant", "content": answer}] if answer else [])


def _answers(model):
    return [model.chat(_chat(q), max_tokens=12, temperature=0) for q, _ in FACTS]


def test_finetuning_teaches_facts_and_leaves_the_base_alone(smollm2_path, tmp_path):
    model = diptych.load(smollm2_path, backend="torch", n_ctx=256)
    before = _answers(model)
    assert not any(a in b for (_, a), b in zip(FACTS, before))
    records = [{"messages": _chat(q, a)} for q, a in FACTS]
    # the last 8 of 30 layers: the backward pass stops there, which keeps this test short
    result = diptych.finetune(model, train=records, valid=records, out=tmp_path, steps=10,
                              batch_size=4, learning_rate=3e-3, warmup_steps=2, rank=8,
                              layers=list(range(22, 30)))
    assert result.steps == 10 and result.valid_loss < 0.5  # from about 5
    assert _answers(model) == [a for _, a in FACTS]
    model.set_adapter(None)
    assert _answers(model) == before
    model.set_adapter(tmp_path / "adapter.gguf")   # the GGUF form teaches the same
    assert _answers(model) == [a for _, a in FACTS]

