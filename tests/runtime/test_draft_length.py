"""The draft-length policy (speculative.DraftLength) on simulated passes: it drafts long while
drafts are accepted, and where they keep failing (rejected, or a draft model too unsure to
draft anything) speculation costs at most 5% over plain decoding, as issue 12 requires."""

import pytest

from diptych.inference import speculative
from diptych.inference.speculative import Costs, DraftLength

MAX = speculative.DEFAULT_DRAFT_MAX
DRAFT = Costs(draft=0.45, verify=0.1)   # a 0.5B draft for a 1.5B target on the CPU
LOOKUP = Costs(draft=0.0, verify=0.1)


def _speed_vs_plain(length: DraftLength, drafter, passes: int = 2000) -> float:
    """Tokens per unit of cost over `passes` passes, relative to plain decoding (1 token per
    target step). `drafter(k)` -> (drafted, accepted) of one pass asked for k tokens; a draft
    model pays a step for each token drafted and for the one that stopped it short."""
    tokens = cost = 0.0
    for _ in range(passes):
        k = length.choose(10_000)
        drafted, accepted = drafter(k) if k else (0, 0)
        steps = min(drafted + 1, k)
        cost += 1 + steps * length.costs.draft + drafted * length.costs.verify
        tokens += accepted + 1
        length.record(k, drafted, accepted)
    return tokens / cost


def test_drafts_long_while_every_draft_is_accepted():
    length = DraftLength(MAX, DRAFT)
    for _ in range(20):
        length.record(MAX, MAX, MAX)
    assert length.choose(10_000) == MAX
    assert length.choose(3) == 3   # never past what the budget and the cache allow


@pytest.mark.parametrize("drafter", [
    pytest.param(lambda k: (0, 0), id="draft model never sure enough to draft"),
    pytest.param(lambda k: (k, 0), id="every draft rejected"),
    pytest.param(lambda k: (1, 0), id="one unsure draft a pass, rejected"),
])
def test_failing_drafts_cost_at_most_5_percent(drafter):
    length = DraftLength(MAX, DRAFT)
    for _ in range(10):   # it had been accepting everything before the text changed
        length.record(4, 4, 4)
    assert _speed_vs_plain(length, drafter) >= 0.95


def test_failing_probes_back_off_and_a_success_brings_them_back():
    length = DraftLength(MAX, DRAFT)
    gaps, since = [], 0
    for _ in range(2000):
        k = length.choose(10_000)
        since += 1
        if k:
            gaps.append(since)
            since = 0
        length.record(k, 0, 0)
    assert gaps[-1] == speculative.PROBE_MAX
    assert gaps[:5] == [16, 32, 64, 128, 256]
    while not length.choose(10_000):
        length.record(0, 0, 0)
    length.record(1, 1, 1)   # the probe's draft was accepted
    assert length.probe_every == speculative.PROBE_EVERY


def test_prompt_lookup_finding_nothing_is_not_a_failure():
    """An empty lookup draft costs nothing: it must not talk the policy out of drafting."""
    length = DraftLength(MAX, LOOKUP)
    for _ in range(10):
        length.record(MAX, MAX, MAX)
    before = length.acceptance
    for _ in range(50):
        length.record(length.choose(10_000), 0, 0)
    assert length.acceptance == before
    assert length.choose(10_000) == MAX
