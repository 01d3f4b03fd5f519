"""The real server (a subprocess) on the real SmolLM2, through the official `openai` client
and raw HTTP: its answers equal the in-process API's at the same settings."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from .conftest import API_KEY, Raw

pytestmark = pytest.mark.real

MODEL = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=smol_server.base, api_key=API_KEY, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def raw(smol_server):
    return Raw(smol_server.base)


def test_banner_shows_the_url_and_a_curl_example(smol_server):
    banner = "".join(smol_server.banner)
    assert smol_server.base in banner and "curl" in banner and "Authorization" in banner


def test_chat_equals_model_chat(client, smol_model):
    messages = [{"role": "user", "content": "Name three fruits."}]
    pieces = list(smol_model.chat_stream(messages, max_tokens=16))  # the model's defaults
    want = "".join(p.text for p in pieces)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].message.role == "assistant"
    n_prompt = len(smol_model.chat_prompt(messages))
    n_gen = sum(len(p.token_ids) for p in pieces)
    assert reply.usage.prompt_tokens == n_prompt
    assert reply.usage.completion_tokens == n_gen
    assert reply.usage.total_tokens == n_prompt + n_gen
    assert reply.choices[0].finish_reason == pieces[-1].finish_reason

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == n_prompt
    assert chunks[-1].usage.completion_tokens == n_gen


def test_sampled_completion_equals_generate_at_the_same_seed(raw, smol_model):
    prompt = "Once upon a time, in a valley far away,"
    settings = dict(temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    pieces = list(smol_model.stream(prompt, 12, **settings))
    want = "".join(p.text for p in pieces)
    reply = raw.post("/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                      **settings})
    assert reply["object"] == "text_completion"
    assert reply["choices"][0]["text"] == want
    assert reply["usage"]["prompt_tokens"] == len(smol_model.tokenize(prompt))
    assert reply["usage"]["completion_tokens"] == sum(len(p.token_ids) for p in pieces)

    chunks = raw.events("/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                         "stream": True, **settings})
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == pieces[-1].finish_reason
    assert all("usage" not in c for c in chunks)


def test_prompt_as_token_ids(raw, smol_model):
    ids = smol_model.tokenize("The capital of France is")
    reply = raw.post("/completions", {"model": MODEL, "prompt": ids, "max_tokens": 6,
                                      "temperature": 0})
    assert reply["choices"][0]["text"] == smol_model.generate(ids, 6, temperature=0)


def test_stop_strings(client, smol_model):
    prompt = "Count: 1, 2, 3, 4,"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                      temperature=0, stop=[" 7"])
    assert reply.choices[0].text == smol_model.generate(prompt, 12, temperature=0, stop=[" 7"])
    assert reply.choices[0].text.startswith(" 5, 6,") and "7" not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"


def test_logprobs_are_the_log_softmax_of_the_models_logits(client, smol_model):
    prompt = "The quick brown fox"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                      temperature=0, logprobs=3)
    lp = reply.choices[0].logprobs
    ids = smol_model.tokenize(prompt)
    generated = smol_model.tokenize(reply.choices[0].text, add_bos=False)
    logits = smol_model.logits(ids + generated)[len(ids) - 1:-1].astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    ref = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    assert len(lp.token_logprobs) == len(generated) == 6
    for row, token, got, top in zip(ref, generated, lp.token_logprobs, lp.top_logprobs):
        assert got == pytest.approx(float(row[token]), abs=2e-3)
        best = np.argsort(row)[::-1][:3]
        assert sorted(top.values(), reverse=True) == pytest.approx(row[best].tolist(), abs=2e-3)

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True,
        top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6
               for t in content)


def test_concurrent_clients_each_get_their_own_answer(client, smol_model, raw):
    questions = ["What is 2 + 2?", "Name a color.", "What is the capital of Italy?",
                 "Say hello in French.", "Name a planet.", "What do bees make?",
                 "Name a large animal.", "What is ice made of?"]
    want = [smol_model.chat([{"role": "user", "content": q}], max_tokens=8, temperature=0)
            for q in questions]
    seen_busy = []

    def ask(q):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=8,
            temperature=0).choices[0].message.content

    def watch_health(done):
        while not done.is_set():   # /health answers while generations run
            seen_busy.append(raw.health()["slots_processing"])

    done = threading.Event()
    watcher = threading.Thread(target=watch_health, args=(done,))
    watcher.start()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, questions))
    done.set()
    watcher.join()
    assert got == want
    assert max(seen_busy) > 1   # several slots ran at once


def test_second_chat_turn_reuses_the_first_turns_cache(client, smol_model):
    first = [{"role": "user", "content": "Tell me a fact about the moon."}]
    reply = client.chat.completions.create(model=MODEL, messages=first, max_tokens=20)
    second = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                      {"role": "user", "content": "And one about the sun?"}]
    again = client.chat.completions.create(model=MODEL, messages=second, max_tokens=8)
    n_first = len(smol_model.chat_prompt(first))
    assert again.usage.prompt_tokens == len(smol_model.chat_prompt(second))
    # the first turn's prompt and reply were not prefilled again
    assert again.usage.prompt_tokens_details.cached_tokens >= n_first + 10


def test_a_disconnect_stops_generation_within_two_tokens_and_frees_the_slot(raw):
    """/health's tokens_after_cancel counts the tokens made for a job after the server saw
    its client go."""
    before = raw.health()
    conn, response = raw.open("POST", "/completions", {
        "model": MODEL, "prompt": "Write a very long story:", "max_tokens": 900,
        "temperature": 0.8, "stream": True})
    assert response.status == 200
    for _ in range(3):
        response.readline()
    assert raw.health()["slots_processing"] == 1
    response.close()
    conn.close()
    for _ in range(400):
        health = raw.health()
        if health["slots_processing"] == 0:
            break
        threading.Event().wait(0.05)
    assert health["slots_processing"] == 0
    assert health["tokens_generated"] - before["tokens_generated"] < 900
    assert health["tokens_after_cancel"] - before["tokens_after_cancel"] <= 2
    # the slot is free: the next request is served
    assert raw.post("/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})


def test_a_long_prompt_does_not_stall_another_stream(raw, smol_model):
    """While a 640-token prompt is prefilled (10 chunks, between decode steps), a running
    stream keeps receiving tokens."""
    never_ends = {str(t): -100 for t in smol_model.tokenizer.eog_ids}
    conn, response = raw.open("POST", "/completions", {
        "model": MODEL, "prompt": "Count from one to a thousand:", "max_tokens": 600,
        "temperature": 0, "stream": True, "logit_bias": never_ends})
    seen, lock, started = [], threading.Lock(), threading.Event()

    def read():
        # the test closes the response under this loop when it is done
        with contextlib.suppress(AttributeError, OSError, ValueError):
            for line in response:
                if line.startswith(b"data: {"):
                    with lock:
                        seen.append("token")
                        if len(seen) >= 3:
                            started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(120)
        long_prompt = (smol_model.tokenize("the quick brown fox jumps over the lazy dog " * 100,
                                           add_bos=False))[:640]
        with lock:
            seen.append("sent")
        raw.post("/completions", {"model": MODEL, "prompt": long_prompt, "max_tokens": 1})
        with lock:
            seen.append("answered")
    finally:
        response.close()
        conn.close()
        reader.join(30)
    during = seen[seen.index("sent"):seen.index("answered")].count("token")
    assert during >= 4, seen


def test_models_and_health(raw, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = raw.health()
    assert health["status"] == "ok"
    assert health["slots_idle"] + health["slots_processing"] == 4


def test_the_openai_client_sees_errors_as_its_own_exceptions(smol_server):
    bad = openai.OpenAI(base_url=smol_server.base, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    good = openai.OpenAI(base_url=smol_server.base, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        good.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                     temperature=7)
    assert err.value.param == "temperature"
