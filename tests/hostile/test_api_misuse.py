"""The Python API misused: two generations on one model, wrong argument types, text that is
not Unicode, and messages that spell the chat template's control tokens. Real models only."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import diptych
from diptych.errors import (GenerationSuperseded, InvalidArgumentError, ModelFileError,
                            TokenizerError)
from diptych.quant.gguf_file import GGUFFile
from diptych.text.tokenizer import Tokenizer

pytestmark = pytest.mark.real

STORY = "Once upon a time, in a small village by the sea,"
FACT = "The capital of France is"


@pytest.fixture(scope="module")
def model(smollm2_path):
    return diptych.load(smollm2_path, backend="torch", n_ctx=512)


@pytest.fixture(scope="module")
def reference(model):
    """Greedy continuations of each prompt, each generated alone."""
    return {p: model.generate(p, max_tokens=12, temperature=0) for p in (STORY, FACT)}


# ---------------------------------------------------------------- two generations, one model
def test_interleaved_streams_never_give_wrong_text(model, reference):
    first = model.stream(STORY, max_tokens=12, temperature=0)
    head = next(first).text + next(first).text
    second = model.stream(FACT, max_tokens=12, temperature=0)
    assert "".join(p.text for p in second) == reference[FACT]
    with pytest.raises(GenerationSuperseded, match="another generation"):
        next(first)
    assert reference[STORY].startswith(head)
    # the model stays usable, and the superseded generator stays finished
    assert model.generate(STORY, max_tokens=12, temperature=0) == reference[STORY]
    with pytest.raises(StopIteration):
        next(first)


def test_logits_supersede_an_unfinished_stream(model):
    pieces = model.stream(STORY, max_tokens=8, temperature=0)
    next(pieces)
    model.logits(model.tokenize("Hello"))
    with pytest.raises(GenerationSuperseded):
        next(pieces)


def test_a_finished_or_closed_stream_does_not_disturb_the_next(model, reference):
    done = list(model.stream(FACT, max_tokens=12, temperature=0))
    closed = model.stream(STORY, max_tokens=12, temperature=0)
    next(closed)
    closed.close()
    assert "".join(p.text for p in done) == reference[FACT]
    assert model.generate(STORY, max_tokens=12, temperature=0) == reference[STORY]


def test_threads_get_their_text_or_a_clear_error(model, reference):
    """Four threads generate on one model at once: each gets its prompt's own greedy text,
    or GenerationSuperseded after a prefix of it, never another prompt's tokens."""
    results: dict[int, tuple[str, BaseException | None]] = {}
    start = threading.Barrier(4)

    def run(n: int) -> None:
        prompt = (STORY, FACT)[n % 2]
        text, error = "", None
        start.wait()
        try:
            for piece in model.stream(prompt, max_tokens=12, temperature=0):
                text += piece.text
        except GenerationSuperseded as exc:
            error = exc
        results[n] = (text, error)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for n, (text, error) in results.items():
        want = reference[(STORY, FACT)[n % 2]]
        assert text == want if error is None else want.startswith(text), (n, text, error)
    assert any(error is None for _, error in results.values())  # the last one to start wins


# ---------------------------------------------------------------- wrong argument types
@pytest.mark.parametrize("prompt", [b"Hi", bytearray(b"Hi"), [1.0, 2.0], ["1", "2"], [True, 2],
                                    [1, None], np.array([1.5, 2.5]), 42, None])
def test_a_prompt_that_is_neither_text_nor_token_ids_is_refused(model, prompt):
    with pytest.raises(InvalidArgumentError):
        model.generate(prompt, max_tokens=2)


def test_integer_token_ids_in_lists_tuples_and_arrays_are_accepted(model):
    ids = model.tokenize(FACT)
    want = model.generate(ids, max_tokens=4, temperature=0)
    assert model.generate(tuple(ids), max_tokens=4, temperature=0) == want
    assert model.generate(np.array(ids, dtype=np.int64), max_tokens=4, temperature=0) == want
    assert model.generate([np.int32(i) for i in ids], max_tokens=4, temperature=0) == want


@pytest.mark.parametrize("stop", [[None], ["ok", 3], 7, b"x", {"a"}])
def test_stop_must_be_strings(model, stop):
    with pytest.raises(InvalidArgumentError, match="stop must be"):
        model.generate(FACT, max_tokens=2, stop=stop)


def test_stop_as_a_tuple_of_strings_works(model, reference):
    out = model.generate(FACT, max_tokens=12, temperature=0, stop=("Paris",))
    assert "Paris" in reference[FACT] and out == reference[FACT].split("Paris")[0]


# ---------------------------------------------------------------- text that is not Unicode
@pytest.mark.parametrize("text", ["\ud800abc", "ok \udcff", "x\udfff\ud800"])
def test_lone_surrogates_are_a_clear_error(model, text):
    with pytest.raises(InvalidArgumentError, match="not valid Unicode: lone surrogate U\\+D"):
        model.tokenize(text)
    with pytest.raises(InvalidArgumentError, match="lone surrogate"):
        model.generate(text, max_tokens=2)
    with pytest.raises(InvalidArgumentError, match="lone surrogate"):
        model.chat([{"role": "user", "content": text}], max_tokens=2)
    assert model.generate(FACT, max_tokens=2, temperature=0)  # still usable


def test_a_template_with_a_corrupt_byte_is_a_model_file_error(smollm2_path):
    md = GGUFFile(smollm2_path).metadata
    tokens = {k: md[k] for k in md if k.startswith("tokenizer.")}
    # what GGUFFile gives for a stored template that is not valid UTF-8
    tokens["tokenizer.chat_template"] = b"{{ messages[0]['content'] }}\xff".decode(
        "utf-8", "surrogateescape")
    tok = Tokenizer.from_gguf_metadata(tokens)
    with pytest.raises(ModelFileError, match="not valid UTF-8"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.encode("still works") == tok.encode("still works")


def test_encode_refuses_bytes(model):
    with pytest.raises(TokenizerError, match="must be a str"):
        model.tokenizer.encode(b"Hi")


@pytest.mark.parametrize("ids", [[1.0], ["5"], [True], [None]])
def test_detokenize_refuses_what_is_not_a_token_id(model, ids):
    with pytest.raises(TokenizerError, match="must be an int"):
        model.detokenize(ids)
    assert model.detokenize([np.int64(1), 2]) == model.detokenize([1, 2])
