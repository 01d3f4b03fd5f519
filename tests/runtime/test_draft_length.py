"""The draft-length policy (speculative.DraftLength) on simulated passes: it drafts long while
drafts are accepted, and where they keep failing (rejected, or a draft model too unsure to
draft anything) speculation costs at most 5% over plain decoding, as issue 12 requires."""

import numpy as np
import pytest

from diptych.inference import speculative
from diptych.inference.speculative import Costs, DraftLength

MAX = speculative.DEFAULT_DRAFT_MAX
DRAFT = Costs(draft=0.45, verify=0.1)   # a 0.5B draft for a 1.5B target on the CPU
LOOKUP = Costs(draft=0.0, verify=0.1)
# the int8 path's measured costs for that pair: a step of width 2 costs 1.35 plain steps
INT8 = Costs(draft=0.4, verify=0.2, first=0.35)


def _speed_vs_plain(length: DraftLength, drafter, passes: int = 2000) -> float:
    """Tokens per unit of cost over `passes` passes, relative to plain decoding (1 token per
    target step). `drafter(k)` -> (drafted, accepted) of one pass asked for k tokens; a draft
    model pays a step for each token drafted and for the one that stopped it short."""
    tokens = cost = 0.0
    for _ in range(passes):
        k = length.choose(10_000)
        drafted, accepted = drafter(k) if k else (0, 0)
        steps = min(drafted + 1, k)
        cost += 1 + steps * length.costs.draft + _verify_cost(length.costs, drafted)
        tokens += accepted + 1
        length.record(k, drafted, accepted)
    return tokens / cost


def _verify_cost(costs: Costs, drafted: int) -> float:
    """What a verify step of width drafted + 1 costs past a plain step."""
    if not drafted:
        return 0.0
    first = costs.verify if costs.first is None else costs.first
    return first + (drafted - 1) * costs.verify


@pytest.mark.parametrize("costs", [DRAFT, INT8], ids=["linear", "width 2 dearer"])
@pytest.mark.parametrize("a,c,k", [(0.8, 1.0, 4), (0.9, 0.6, 6), (0.5, 0.9, 2)])
def test_the_expected_value_of_a_pass_is_what_passes_give(a, c, k, costs):
    """A drafter that draws each next token with probability c and a target accepting each
    draft with probability a: tokens per unit of cost over many simulated passes of length
    k equal `value(k)` given those rates."""
    rng = np.random.default_rng(0)
    length = DraftLength(MAX, costs)
    length.accepted, length.rejected = a, 1 - a
    length.stopped, length.tried = 1 - c, 1.0
    tokens = cost = 0.0
    for _ in range(20_000):
        drafted = k if c == 1 else min(k, int(rng.geometric(1 - c)) - 1)
        accepted = min(drafted, int(rng.geometric(1 - a)) - 1)
        tokens += accepted + 1
        cost += 1 + min(drafted + 1, k) * costs.draft + _verify_cost(costs, drafted)
    assert tokens / cost == pytest.approx(length.value(k), rel=0.02)


def _accepting(length: DraftLength, passes: int = 60) -> DraftLength:
    """`length` after `passes` passes in which every draft was accepted."""
    for _ in range(passes):
        k = length.choose(10_000)
        length.record(k, k, k)
    return length


def test_drafts_long_while_every_draft_is_accepted():
    length = _accepting(DraftLength(MAX, DRAFT))
    assert length.choose(10_000) == MAX
    assert length.choose(3) == 3   # never past what the budget and the cache allow


@pytest.mark.parametrize("drafter", [
    pytest.param(lambda k: (0, 0), id="draft model never sure enough to draft"),
    pytest.param(lambda k: (k, 0), id="every draft rejected"),
    pytest.param(lambda k: (1, 0), id="one unsure draft a pass, rejected"),
])
def test_failing_drafts_cost_at_most_5_percent(drafter):
    # it had been accepting everything before the text changed
    length = _accepting(DraftLength(MAX, DRAFT))
    assert _speed_vs_plain(length, drafter) >= 0.95


def test_a_draft_model_unsure_now_and_then_keeps_drafting():
    """Code, say: one pass in five the draft model is too unsure to draft anything, and
    otherwise it drafts two or three tokens, all accepted. The empty passes cost a draft
    step each, which must not talk the policy out of drafting where it pays."""
    length = DraftLength(MAX, DRAFT)
    passes = iter(range(10**6))

    def drafter(k):
        i = next(passes)
        n = 0 if i % 5 == 0 else min(k, 2 + i % 2)
        return n, n

    assert _speed_vs_plain(length, drafter) >= 1.1
    assert length.choose(10_000) > 1


def test_a_generation_tries_drafting_before_it_judges():
    """The prior alone says a draft with these costs does not pay: a generation still drafts
    from its first pass, and with every draft accepted it never stops."""
    length = DraftLength(MAX, INT8)
    assert max(range(MAX + 1), key=length.value) == 0   # the prior's verdict
    assert length.choose(10_000) == MAX   # what would pay most were every draft accepted
    length.record(MAX, 3, 3)
    for _ in range(40):
        k = length.choose(10_000)
        assert k > 0 and not length.probing
        drafted = min(k, 3)   # the draft model stops short, sure of three tokens
        length.record(k, drafted, drafted)


def test_a_draft_model_that_often_stops_short_keeps_drafting():
    """Every draft accepted, but the draft model unsure of the next token one time in five:
    the first passes' evidence (long drafts asked for) outweighs the prior, and drafting
    never stops."""
    rng = np.random.default_rng(1)
    length = DraftLength(MAX, INT8)
    for _ in range(60):
        k = length.choose(10_000)
        assert k > 0 and not length.probing
        drafted = min(k, int(rng.geometric(0.2)) - 1)
        length.record(k, drafted, drafted)


def test_a_draft_rejected_at_its_first_token_is_one_judgement():
    """Prompt lookup's first match, rejected at its first token, judged one draft (the
    target never judged the others): the next passes still draft."""
    length = DraftLength(MAX, Costs(draft=0.0, verify=0.25, first=0.4))
    length.record(length.choose(10_000), MAX, 0)
    assert max(range(MAX + 1), key=length.value) == 0   # the estimate's verdict so far
    assert length.choose(10_000) > 0


def test_an_unsure_draft_model_stops_after_its_evidence():
    """A draft model never sure enough to draft: its empty drafts count as evidence (and
    the rate of them can end the trial early: drafts always accepted would not pay)."""
    length = DraftLength(MAX, DRAFT)
    tried = []
    for _ in range(40):
        k = length.choose(10_000)
        tried.append(k > 0)
        length.record(k, 0, 0)
    assert tried[0] and sum(tried[:speculative.PROBE_EVERY]) <= speculative.EVIDENCE


def _unsure(length: DraftLength) -> DraftLength:
    """`length` once its first drafts (tried whatever the prior says) came back empty."""
    for _ in range(speculative.EVIDENCE):
        length.record(1, 0, 0)
    return length


def test_failing_probes_back_off_and_a_success_brings_them_back():
    length = _unsure(DraftLength(MAX, DRAFT))
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


def test_one_lucky_probe_does_not_resume_drafting():
    length = _unsure(DraftLength(MAX, DRAFT))
    outcomes = iter([1, 0] * 10 + [1, 1, 1])   # probes: lucky once, then failing; 3 in a row
    resumed_after = None
    for i in range(2000):
        k = length.choose(10_000)
        if k and not length.probing:
            resumed_after = i
            break
        if k:
            ok = next(outcomes)
            length.record(k, ok, ok)
    assert resumed_after is not None and length.streak == 0
    assert next(outcomes, None) is None   # only after the three in a row


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
