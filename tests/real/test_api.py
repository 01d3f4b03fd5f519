"""The Python API on the real default model: generation, streaming, chat, errors, Ctrl+C."""

import numpy as np
import pytest

import diptych
from diptych import ContextOverflowError, DiptychError, ModelFileError, SamplingError


def test_greedy_generate_is_deterministic_and_sensible(smollm2):
    a = smollm2.generate("The capital of France is", max_tokens=8, temperature=0)
    b = smollm2.generate("The capital of France is", max_tokens=8, temperature=0)
    assert a == b and "Paris" in a


def test_stream_yields_pieces_with_ids_and_timings(smollm2):
    pieces = list(smollm2.stream("Write a haiku about the sea.", max_tokens=12,
                                 temperature=0.7, top_p=0.9, seed=1))
    again = list(smollm2.stream("Write a haiku about the sea.", max_tokens=12,
                                temperature=0.7, top_p=0.9, seed=1))
    assert [p.text for p in pieces] == [p.text for p in again]
    ids = [t for p in pieces for t in p.token_ids]
    assert len(ids) == 12 and pieces[-1].finish_reason == "length"
    assert "".join(p.text for p in pieces) == smollm2.detokenize(ids)
    assert pieces[-1].timings.generated_tokens == 12 and pieces[-1].timings.prefill_tps > 0


def test_chat_uses_template_and_stops_at_end_of_turn(smollm2):
    prompt = smollm2.chat_prompt([{"role": "user", "content": "Hi!"}])
    text = smollm2.detokenize(prompt)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    pieces = list(smollm2.chat_stream([{"role": "user", "content": "Say hello."}],
                                      max_tokens=200, temperature=0))
    assert pieces[-1].finish_reason == "stop"
    assert "<|im_end|>" not in "".join(p.text for p in pieces)


def test_stop_strings(smollm2):
    out = smollm2.generate("Count: 1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    assert out.startswith(" 5, 6,") and "7" not in out


def test_tokenize_round_trip(smollm2):
    ids = smollm2.tokenize("some text")
    assert all(isinstance(i, int) for i in ids) and smollm2.detokenize(ids) == "some text"


def test_logits_shape_and_dtype(smollm2):
    ids = smollm2.tokenize("Hello world")
    logits = smollm2.logits(ids)
    assert logits.shape == (len(ids), smollm2.config.vocab_size) and logits.dtype == np.float32


def test_prompt_longer_than_context_is_a_clear_error(smollm2_path):
    model = diptych.load(smollm2_path, n_ctx=16)
    with pytest.raises(ContextOverflowError, match="16"):
        model.generate("word " * 40, max_tokens=4)
    with pytest.raises(ContextOverflowError):
        model.logits(list(range(100, 130)))
    # generation stops at the end of the context rather than overflowing
    pieces = list(model.stream("Hi", max_tokens=100, temperature=0))
    used = pieces[-1].timings.prompt_tokens + sum(len(p.token_ids) for p in pieces)
    assert used <= 16
    assert pieces[-1].finish_reason == "stop" or used == 16  # "length": the context is full


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 2}, {"max_tokens": 0},
                                    {"seed": "x"}, {"top_k": -5}])
def test_invalid_generation_parameters(smollm2, kwargs):
    with pytest.raises(SamplingError):
        smollm2.generate("hi", **{"max_tokens": 4, **kwargs})


def test_bad_token_ids_and_missing_files(smollm2, tmp_path):
    with pytest.raises(DiptychError):
        smollm2.logits([10**9])
    with pytest.raises(ModelFileError, match="no such file"):
        diptych.load(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelFileError):
        diptych.load(tmp_path / "junk.gguf")


def test_interrupt_mid_prefill_leaves_model_usable(smollm2, monkeypatch):
    expected = smollm2.generate("Once upon a time", max_tokens=6, temperature=0)
    smollm2.generate("Something else entirely to fill the cache", max_tokens=2, temperature=0)
    backend = smollm2.backend
    real_linear, calls = backend.linear, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return real_linear(*args, **kwargs)

    monkeypatch.setattr(backend, "linear", flaky)
    with pytest.raises(KeyboardInterrupt):
        smollm2.generate("Once upon a time", max_tokens=6, temperature=0)
    monkeypatch.undo()
    assert smollm2.generate("Once upon a time", max_tokens=6, temperature=0) == expected


def test_interrupt_mid_generation_keeps_text_so_far(smollm2, smollm2_path):
    def pieces(model, prompt, n):
        return [(p.text, p.token_ids) for p in model.stream(prompt, max_tokens=n, temperature=0)]

    uninterrupted = pieces(smollm2, "List the planets:", 50)
    got = []
    stream = smollm2.stream("List the planets:", max_tokens=50, temperature=0)
    for i, piece in enumerate(stream):
        got.append((piece.text, piece.token_ids))
        if i == 5:
            stream.close()  # what a consumer does on Ctrl+C
            break
    assert got == uninterrupted[:6]
    # the cache holds the interrupted stream's tokens; the next prompt reuses part of them
    fresh = diptych.load(smollm2_path, n_ctx=2048)
    for prompt in ("List the planets: Mercury, Venus", "2 + 2 ="):
        assert pieces(smollm2, prompt, 8) == pieces(fresh, prompt, 8)


def test_context_that_does_not_fit_in_memory_is_refused_before_allocating(smollm2_path):
    with pytest.raises(diptych.OutOfMemoryError, match="n_ctx"):
        diptych.load(smollm2_path, n_ctx=100_000_000)  # ~4.6 TB of KV cache


def test_cache_memory_is_what_the_storage_holds(smollm2):
    cfg = smollm2.config
    el = smollm2.backend.kv_bytes_per_element()
    if smollm2.backend.name == "torch":
        assert el == 2  # fp16 on the CPU, bf16 on CUDA
    expected = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * smollm2.n_ctx * el
    assert smollm2.engine.cache_bytes == expected
    assert smollm2.engine.main.cache.storage.nbytes == expected


def test_weights_stay_quantized(smollm2):
    be, weights = smollm2.backend, smollm2.engine.weights
    held = sum(be.weight_bytes(w) for _, w in weights.linears())
    file_bytes = sum(t.nbytes for n, t in smollm2.gguf.tensors.items() if t.shape[0] > 1 and len(t.shape) == 2)
    assert held <= 1.2 * file_bytes
