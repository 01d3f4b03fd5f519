"""The GGUF tokenizer against llama.cpp, and the sandboxed chat-template renderer.

The llama.cpp ids come from tests/fixtures/tokenizer_<model>.json, written by
scripts/make_tokenizer_fixtures.py (llama-cpp-python, vocab_only) for every text of
tests/fixtures/tokenizer_corpus.json; llama-cpp-python is not needed to run these tests.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime
from pathlib import Path

import pytest

from diptych.text.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat
from diptych.errors import (ChatTemplateError, DiptychError, InvalidArgumentError,
                            ModelFileError, UnsupportedModelError)
from diptych.quant.gguf_file import GGUFFile
from diptych.text.special_tokens import SpecialTokens
from diptych.text.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CORPUS = json.loads((FIXTURES / "tokenizer_corpus.json").read_text(encoding="utf-8"))
MODELS = ["smollm2", "qwen", "gemma3"]


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"tokenizer_{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def metadata_of(request):
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            fixture = {"smollm2": "smollm2_path", "qwen": "qwen_path", "gemma3": "gemma3_path"}
            path = request.getfixturevalue(fixture[name])
            cache[name] = GGUFFile(path).metadata
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tokenizer_of(metadata_of):
    cache: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in cache:
            cache[name] = Tokenizer.from_gguf_metadata(metadata_of(name))
        return cache[name]

    return get


# ------------------------------------------------------------------ agreement with llama.cpp
def test_corpus_is_varied_enough():
    assert len(CORPUS) >= 60
    assert "" in CORPUS and " " in CORPUS
    joined = "".join(CORPUS)
    for needle in ("\r\n", "\t", "   ", "é", "中文", "日本語", "한국어", "\u200d", "🏽", "<|im_start|>",
                   "don't", "I'LL", "https://", "1234567890"):
        assert needle in joined, needle
    for name in MODELS:
        fx = _fixture(name)
        assert [it["text"] for it in fx["items"]] == CORPUS, f"regenerate tokenizer_{name}.json"


@pytest.mark.real
@pytest.mark.parametrize("name", MODELS)
def test_ids_equal_llama_cpp(name, tokenizer_of):
    tok, fx = tokenizer_of(name), _fixture(name)
    bad = []
    for item in fx["items"]:
        for parse_special, key in ((True, "ids_special"), (False, "ids_plain")):
            ours = tok.encode(item["text"], parse_special=parse_special)
            if ours != item[key]:
                bad.append((item["text"], parse_special, ours, item[key]))
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]!r}"


def test_space_prefix_sentencepiece_equals_llama_cpp():
    """The SentencePiece rule none of the real models has: a space before the text and after
    every special token (Llama 2, Mistral). A tiny vocabulary llama.cpp's converter wrote,
    on texts built from its own tokens (scripts/make_tokenizer_fixtures.py)."""
    fx = _fixture("llama_spm")
    tok = Tokenizer.from_gguf_metadata(
        GGUFFile(FIXTURES / "convert" / "llama" / "llama.cpp.gguf").metadata)
    assert tok.kind == "spm" and tok.add_space_prefix and tok.add_bos == fx["add_bos"]
    assert sum("<s>" in item["text"] or "</s>" in item["text"] for item in fx["items"]) >= 20
    bad = [(item["text"], mode) for item in fx["items"]
           for mode, key in ((True, "ids_special"), (False, "ids_plain"))
           if tok.encode(item["text"], parse_special=mode) != item[key]]
    assert not bad, f"{len(bad)} of {2 * len(fx['items'])} differ, first: {bad[0]!r}"


@pytest.mark.real
@pytest.mark.parametrize("name", MODELS)
def test_special_ids_and_bos_rule_equal_llama_cpp(name, tokenizer_of):
    tok, fx = tokenizer_of(name), _fixture(name)
    assert tok.vocab_size == fx["n_vocab"]
    assert tok.bos_id == fx["bos_id"] and tok.eos_id == fx["eos_id"]
    assert tok.add_bos == fx["add_bos"] and tok.add_eos == fx["add_eos"]
    assert sorted(tok.eog_ids) == fx["eog_ids"]
    assert [i for i in range(tok.vocab_size) if tok.token_type(i) == 3] == fx["control_ids"]
    assert all(tok.is_special(i) for i in fx["control_ids"])
    text = "Hi"
    assert tok.encode(text, add_bos=True)[0] == tok.bos_id
    assert tok.bos_id not in tok.encode(text, add_bos=False)
    assert (tok.encode(text)[0] == tok.bos_id) == fx["add_bos"]


@pytest.mark.real
@pytest.mark.parametrize("name", MODELS)
def test_token_bytes_equal_llama_cpp_pieces(name, tokenizer_of):
    tok, fx = tokenizer_of(name), _fixture(name)
    assert fx["pieces_hex"]
    for token_id, hex_bytes in fx["pieces_hex"].items():
        assert tok.token_bytes(int(token_id)) == bytes.fromhex(hex_bytes), token_id


@pytest.mark.real
@pytest.mark.parametrize("name", MODELS)
def test_token_bytes_concatenate_to_the_text(name, tokenizer_of):
    tok = tokenizer_of(name)
    for text in CORPUS:
        for parse_special in (True, False):
            ids = tok.encode(text, add_bos=False, parse_special=parse_special)
            assert b"".join(map(tok.token_bytes, ids)) == text.encode("utf-8"), text


@pytest.mark.real
@pytest.mark.parametrize("name", MODELS)
def test_decode_round_trips(name, tokenizer_of):
    tok = tokenizer_of(name)
    for text in CORPUS:
        if tok.kind == "bpe":
            assert tok.decode(tok.encode(text)) == text, text
        # BOS per the model's rule, control-token look-alikes kept as text
        ids = tok.encode(text, parse_special=False)
        assert tok.decode(ids, skip_special=True) == text, text
        assert tok.decode(tok.encode(text, add_bos=False)) == text, text


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2", "qwen"])
def test_chatml_models_end_generation_on_im_end(name, tokenizer_of):
    tok = tokenizer_of(name)
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end is not None and im_end in tok.eog_ids
    assert tok.token_to_id("<|endoftext|>") in tok.eog_ids
    assert tok.encode("<|im_end|>", add_bos=False) == [im_end]
    assert len(tok.encode("<|im_end|>", add_bos=False, parse_special=False)) > 1
    assert tok.decode([im_end]) == "<|im_end|>"
    assert tok.decode([im_end], skip_special=True) == ""


@pytest.mark.real
def test_gemma_end_of_turn_and_sentencepiece_details(tokenizer_of):
    tok = tokenizer_of("gemma3")
    assert tok.kind == "spm"
    assert tok.token_to_id("<end_of_turn>") in tok.eog_ids
    assert tok.token_bytes(tok.token_to_id("<0x0A>")) == b"\n"
    assert tok.token_bytes(tok.token_to_id("\u2581the")) == b" the"
    # a character outside the vocabulary falls back to byte tokens
    ids = tok.encode("\U0001F9FF" * 3, add_bos=False)
    assert b"".join(map(tok.token_bytes, ids)) == ("\U0001F9FF" * 3).encode()


@pytest.mark.real
def test_utf8_character_split_over_tokens_is_recovered_by_token_bytes(tokenizer_of):
    tok = tokenizer_of("smollm2")
    ids = tok.encode("👨‍👩‍👧‍👦", add_bos=False)
    pieces = [tok.token_bytes(i) for i in ids]
    assert any(_not_utf8(p) for p in pieces)       # some token holds part of a character
    assert b"".join(pieces).decode() == "👨‍👩‍👧‍👦"


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.real
def test_encode_is_thread_safe_across_parse_special_modes(tokenizer_of):
    tok = tokenizer_of("qwen")
    text = "<|im_start|>user\nhello<|im_end|>\n" * 20
    want = {True: tok.encode(text), False: tok.encode(text, parse_special=False)}
    errors = []

    def work(mode):
        for _ in range(50):
            if tok.encode(text, parse_special=mode) != want[mode]:
                errors.append(mode)

    threads = [threading.Thread(target=work, args=(m,)) for m in (True, False) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.real
def test_bad_ids_and_inputs_raise_diptych_errors(tokenizer_of):
    tok = tokenizer_of("smollm2")
    with pytest.raises(DiptychError):
        tok.decode([tok.vocab_size])
    with pytest.raises(DiptychError):
        tok.token_bytes(-1)
    with pytest.raises(DiptychError, match="must be a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------------ metadata edge cases
@pytest.mark.real
def test_unknown_pre_tokenizer_falls_back_with_a_warning(metadata_of, caplog):
    source = metadata_of("smollm2")
    md = {k: source[k] for k in source if k.startswith("tokenizer.")}
    md["tokenizer.ggml.pre"] = "no-such-pre-tokenizer"
    with caplog.at_level(logging.WARNING, logger="diptych.text.tokenizer"):
        tok = Tokenizer.from_gguf_metadata(md)
    assert "no-such-pre-tokenizer" in caplog.text
    assert tok.decode(tok.encode("Hello world, 123!")) == "Hello world, 123!"


def test_unsupported_or_missing_vocabularies_raise():
    with pytest.raises(ModelFileError):
        Tokenizer.from_gguf_metadata({})
    with pytest.raises(UnsupportedModelError):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert",
                                      "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ModelFileError):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
                                      "tokenizer.ggml.tokens": ["a", "b"]})  # no merges


def test_tiny_byte_level_vocabulary_from_plain_mapping():
    from diptych.text.tokenizer import bytes_to_unicode

    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": alphabet + ["ab", "Ġab", "<|end|>"],
        "tokenizer.ggml.token_type": [1] * 258 + [3],
        "tokenizer.ggml.merges": ["a b", "Ġ ab"],
        "tokenizer.ggml.eos_token_id": 258,
    }
    tok = Tokenizer.from_gguf_metadata(md)
    ab, sp_ab = 256, 257
    assert tok.encode("ab ab<|end|>") == [ab, sp_ab, 258]
    assert tok.eog_ids == {258}
    assert tok.decode(tok.encode("ab ab é<|end|>"), skip_special=True) == "ab ab é"


def test_tiny_sentencepiece_vocabulary_merges_by_score():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["\u2581", "a", "b", "c", "ab", "bc", "abc", "\u2581abc"]
    types = [2, 3, 3] + [6] * 256 + [1] * 8
    base = len(tokens) - 8
    scores = [0.0] * (base) + [-1, -1, -1, -1, -5, -2, -3, -4]
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0}
    tok = Tokenizer.from_gguf_metadata(md)
    assert tok.add_bos and tok.add_space_prefix          # llama.cpp's SentencePiece defaults
    ids = tok.encode("abc")
    # "bc" (score -2) merges before "ab" (-5); then "abc" (-3); then "▁abc" (-4)
    assert ids == [1, base + 7]
    assert tok.decode(ids, skip_special=True) == "abc"   # prefix space removed
    assert tok.encode("é", add_bos=False) == [base, 3 + 0xC3, 3 + 0xA9]   # byte fallback
    # llama.cpp prefixes the space to the text after every special token too
    assert tok.encode("abc</s>abc", add_bos=False) == [base + 7, 2, base + 7]
    assert tok.encode_offsets("abc</s>abc") == ([base + 7, 2, base + 7],
                                                [(0, 3), (3, 7), (7, 10)])
    assert tok.decode(tok.encode("é")) == "<s>é"


def test_sentencepiece_ties_merge_the_leftmost_pair_and_unknowns_fall_back():
    # "ba" has the lower id and the same score as "ab": llama.cpp merges the leftmost pair
    tokens = ["<unk>", "<s>", "a", "b", "ba", "ab"]
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": [2, 3, 1, 1, 1, 1],
          "tokenizer.ggml.scores": [0, 0, -1, -1, -2, -2],
          "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.unknown_token_id": 0}
    tok = Tokenizer.from_gguf_metadata(md)
    assert tok.encode("aba", add_bos=False) == [5, 2]
    assert tok.encode("bab", add_bos=False) == [4, 3]
    # no <0xNN> tokens: a character outside the vocabulary is the unknown token, per byte
    assert tok.encode("aé", add_bos=False) == [2, 0, 0]
    del md["tokenizer.ggml.unknown_token_id"]
    with pytest.raises(DiptychError, match="not in the vocabulary"):
        Tokenizer.from_gguf_metadata(md).encode("é")


def test_special_tokens_split_longest_first_as_llama_cpp_does():
    st = SpecialTokens([("ab", 10, True, False), ("bcd", 11, True, False),
                        ("\n", 12, False, False), ("\n\n", 13, False, False),
                        ("<|end|>", 14, True, True)])
    # leftmost-first would take "ab"; llama.cpp splits out the longer "bcd" first
    assert st.split("abcd", True) == [(0, 1, None), (1, 4, 11)]
    assert st.split("abcd", False) == [(0, 4, None)]          # control tokens stay text
    assert st.split("x\n\n\n", False) == [(0, 1, None), (1, 3, 13), (3, 4, 12)]
    assert st.split("\n", True) == [(0, 1, 12)]
    # rstrip (Phi-3's control tokens) drops the whitespace after the token
    assert st.split("a<|end|> \n\t b", True) == [(0, 1, None), (1, 8, 14), (12, 13, None)]
    assert st.split("", True) == []
    # equal lengths: the lower id first (llama.cpp's order among them is its sort's)
    st = SpecialTokens([("ab", 20, False, False), ("bc", 10, False, False)])
    assert st.split("abc", True) == [(0, 1, None), (1, 3, 10)]
    # a hostile run of newlines: every run length is a token (Gemma 3 has 31 of them)
    st = SpecialTokens([("\n" * k, k, False, False) for k in range(1, 32)])
    parts = st.split("\n" * 1_000_000 + "x", False)
    assert len(parts) == 32_258 + 2                        # 31 x 32,258 + 2 = 10**6
    assert parts[-3:] == [(999_967, 999_998, 31), (999_998, 10**6, 2), (10**6, 10**6 + 1, None)]


@pytest.mark.real
def test_tokenizer_json_export_tokenizes_like_llama_cpp(tokenizer_of):
    from tokenizers import Tokenizer as HFTokenizer

    tok, fx = tokenizer_of("smollm2"), _fixture("smollm2")
    hf = HFTokenizer.from_str(tok.to_tokenizer_json())
    for item in fx["items"]:
        ids = item["ids_special"][1:] if fx["add_bos"] else item["ids_special"]
        assert hf.encode(item["text"], add_special_tokens=False).ids == ids, item["text"]
    with pytest.raises(DiptychError):
        tokenizer_of("gemma3").to_tokenizer_json()


# ------------------------------------------------------------------ chat templates
CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is 2+2?"}]


@pytest.mark.real
def test_smollm2_template_renders_exactly(tokenizer_of):
    tok = tokenizer_of("smollm2")
    assert tok.chat_template
    want = ("<|im_start|>system\nYou are terse.<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert render_chat(tok.chat_template, CONVERSATION) == want
    assert tok.apply_chat_template(CONVERSATION) == want
    # no system message: the template supplies its own
    two = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    want2 = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
             "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert render_chat(tok.chat_template, two, add_generation_prompt=False) == want2
    ids = tok.encode(want, add_bos=False)
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids.count(tok.token_to_id("<|im_end|>")) == 2


@pytest.mark.real
def test_qwen_template_renders_exactly(tokenizer_of):
    tok = tokenizer_of("qwen")
    want = ("<|im_start|>system\nYou are terse.<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert render_chat(tok.chat_template, CONVERSATION) == want
    two = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    want2 = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
             "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(tok.chat_template, two) == want2


@pytest.mark.real
def test_qwen_template_with_tools_matches_transformers(tokenizer_of):
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    tok = tokenizer_of("qwen")
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Météo d'une ville",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
    ]
    ours = render_chat(tok.chat_template, messages, tools=tools)
    theirs = chat_utils.render_jinja_template(
        conversations=[messages], tools=tools, chat_template=tok.chat_template,
        add_generation_prompt=True)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    theirs = theirs[0] if isinstance(theirs, list) else theirs
    assert ours == theirs
    assert '"description": "Météo d\'une ville"' in ours      # tojson keeps non-ASCII


def test_default_template_is_chatml():
    want = ("<|im_start|>system\nYou are terse.<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(None, CONVERSATION) == want
    assert render_chat(DEFAULT_CHAT_TEMPLATE, CONVERSATION) == want
    assert render_chat(None, CONVERSATION, add_generation_prompt=False) == want[:-len(
        "<|im_start|>assistant\n")]


def test_template_helpers():
    t = ("{{ bos_token }}{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ strftime_now('%Y') }}"
         "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}"
         "{% endfor %}{% generation %}G{% endgeneration %}")
    out = render_chat(t, CONVERSATION, bos_token="<s>", x={"é": [1, "<b>"]})
    assert out == ('<s>{"é": [1, "<b>"]}|{\n  "é": [\n    1,\n    "<b>"\n  ]\n}|'
                   f"{datetime.now().year}systemG")


def test_raise_exception_becomes_chat_template_error():
    t = ("{% if messages[0]['role'] != 'user' %}"
         "{{ raise_exception('roles must alternate') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(t, CONVERSATION)


_UNSAFE = "tried to leave its sandbox"


@pytest.mark.parametrize("template, error", [
    ("{{ ''.__class__.__mro__ }}", _UNSAFE),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", _UNSAFE),
    ("{{ messages.__class__ }}", _UNSAFE),
    ("{{ cycler.__init__.__globals__ }}", _UNSAFE),
    ("{{ joiner.__init__.__globals__['os'] }}", _UNSAFE),
    ("{{ lipsum.__globals__['os'].popen('id').read() }}", "'lipsum' is undefined"),
    ("{{ self._TemplateReference__context }}", _UNSAFE),
    ("{{ ''|attr('__class__') }}", _UNSAFE),
    ("{{ '{0.__class__}'.format(messages) }}", _UNSAFE),
    ("{{ dict.__base__ }}", _UNSAFE),
    ("{% set _ = messages.append({'role': 'x', 'content': 'y'}) %}", "'append' of 'list' object is unsafe"),
    ("{{ messages[0].update({'role': 'x'}) }}", "'update' of 'dict' object is unsafe"),
    ("{{ 'x' * 100000000 }}", r"100,000,000 characters or items with the operator '\*'"),
    ("{{ 10 ** 100000000 }}", r"wider than 4,096 bits with the operator '\*\*'"),
    # values that are never printed must be bounded too
    ("{% set x = 10 ** 3000000 %}ok", r"wider than 4,096 bits with the operator '\*\*'"),
    ("{% set x = (((2**1000)**1000)**1000)**1000 %}ok", r"4,096 bits"),
    ("{% set x = 'x' * 10**9 %}ok", r"operator '\*'"),
    ("{% for i in range(100000000) %}{% endfor %}", "Range too big"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
     "limit of 1,000,000 steps"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}ok", "with the operator '~'"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}ok", r"with the operator '\+'"),
    ("{{ 'x'|center(1500000000) }}", "passes 1500000000 to the filter 'center'"),
    ("{% set x = 'x'.ljust(10**9) %}ok", "passes 1000000000 to a call of 'ljust'"),
    ("{% set x = '%1000000000d' % 1 %}ok", r"with the operator '%'"),
    ("{% set x = '{:1000000000}'.format(1) %}ok", "with str.format"),
    ("{% set x = '{:{}}'.format(1, 10**9) %}ok", "format width from an argument"),
    ("{% set s = 'x' * 1000000 %}{% set x = s|replace('x', s) %}ok", "the filter 'replace'"),
    ("{% set s = '\n' * 1000000 %}{% set x = s|indent(1000000) %}ok", "the filter 'indent'"),
    ("{% set s = 'x' * 1000000 %}{% set x = ([s] * 1000000)|join %}ok", "the filter 'join'"),
    ("{% set s = 'x' * 1000000 %}{{ [s] * 1000000 }}", "printing a value"),
    ("{% set s = 'x' * 1000000 %}{{ ([s] * 1000000)|upper|length }}", "the filter 'upper'"),
    ("{% set s = 'x' * 1000000 %}{% set x = [[s]] * 1000000 %}{{ x|sum(start=[])|length }}",
     "the filter 'sum'"),
    ("{% for i in range(100000) %}{% set x %}{{ 'y' * 1000000 }}{% endset %}{% endfor %}",
     "built more than 64,000,000 characters"),
    ("{% for i in range(9) %}{{ 'y' * 1000000 }}{% endfor %}", "output exceeds its limit"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
])
def test_sandbox_escape_and_exhaustion_attempts_raise(template, error):
    with pytest.raises(ChatTemplateError, match=error):
        render_chat(template, CONVERSATION)


def test_template_limits_hold_in_worker_threads():
    """The bounds are per render and need no signal: they hold in a worker thread, and a
    render that hits one leaves other renders unaffected."""
    results = {}

    def run(name, template):
        try:
            results[name] = render_chat(template, CONVERSATION)
        except ChatTemplateError as e:
            results[name] = e

    hang = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    threads = [threading.Thread(target=run, args=("hang", hang)),
               threading.Thread(target=run, args=("chatml", DEFAULT_CHAT_TEMPLATE))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["hang"], ChatTemplateError)
    assert "steps" in str(results["hang"])
    assert results["chatml"] == render_chat(None, CONVERSATION)


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m.content }}",      # unclosed block
    "{{ }}",
    "{% if %}x{% endif %}",
    "{{ messages[0] ",
    "{% endfor %}",
    "{% nosuchtag %}",
])
def test_malformed_templates_raise(template):
    with pytest.raises(ChatTemplateError, match="malformed chat template"):
        render_chat(template, CONVERSATION)


def test_errors_inside_the_template_raise_chat_template_error():
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render_chat("{{ messages[0]['content'] + 1 }}", CONVERSATION)
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        render_chat("{{ 1 / 0 }}", CONVERSATION)


@pytest.mark.parametrize("messages", [
    "hello",
    [{"content": "no role"}],
    [{"role": "user"}],
    [{"role": "user", "content": 3}],
    [{"role": "user", "content": ["a", "b"]}],
    [("user", "hi")],
    [{"role": "", "content": "x"}],
])
def test_bad_messages_raise_a_clear_error(messages):
    with pytest.raises(InvalidArgumentError, match=r"messages"):
        render_chat(DEFAULT_CHAT_TEMPLATE, messages)
