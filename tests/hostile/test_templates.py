"""Hostile chat templates (defect 1 of the hostile-input issue): every probe, and a seeded
fuzzer of loops, string growth, numeric blow-up and recursion, each in its own process
under the suite's time and memory limits. A template renders bounded text or raises a
ChatTemplateError; nothing hangs, runs out of memory or raises anything else."""

from __future__ import annotations

import random

import pytest

from diptych.text.template_sandbox import MAX_SIZE

from . import probes
from .isolation import assert_refused

PROBES = [
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
     "steps"),
    ("{{ 'x'|center(1500000000) }}", "the filter 'center'"),
    ("{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s|length }}", "the operator '~'"),
    ("{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}{{ ns.s|length }}", "the operator '+'"),
    ("{{ (((2**1000)**1000)**1000)**1000 }}", "4,096 bits"),
    ("{% set x = 10 ** 3000000 %}ok", "4,096 bits"),
]


@pytest.mark.parametrize("template, construct", PROBES)
def test_issue_probes_are_refused_naming_the_construct(isolated, template, construct):
    assert_refused(isolated(probes.render, template), construct, error="ChatTemplateError")


# -- the fuzzer -------------------------------------------------------------------------------

def _loops(rng: random.Random) -> str:
    body = rng.choice(["", "x", "{{ a }}", "{% if a is odd %}{{ a ~ 'y' }}{% endif %}"])
    for name in "abc"[:rng.randint(1, 3)]:
        n = rng.choice([10, 1000, 99999])
        body = f"{{% for {name} in range({n}) %}}{body}{{% endfor %}}"
    return body.replace("{{ a }}", "{{ loop.index }}") if rng.random() < 0.3 else body


def _growth(rng: random.Random) -> str:
    op = rng.choice(["~", "+", "*2 if false else ns.s +"])
    seed = rng.choice(["'x'", "'ab' * 1000", "[1]", "[1, 2] * 500"]) if op == "+" else "'x'"
    steps = rng.choice([5, 25, 40, 64])
    return (f"{{% set ns = namespace(s={seed}) %}}{{% for i in range({steps}) %}}"
            f"{{% set ns.s = ns.s {op} ns.s %}}{{% endfor %}}{{{{ ns.s|length }}}}")


def _amplify(rng: random.Random) -> str:
    n = rng.choice([10, 10**6, 10**7, 10**9, 2**40])
    big = "('x' * 1000000)"
    return rng.choice([
        f"{{{{ 'ab' * {n} }}}}", f"{{{{ [0] * {n} }}}}", f"{{{{ 'x'|center({n}) }}}}",
        f"{{{{ 'x\\n'|indent({n}) }}}}", f"{{{{ {big}|replace('x', 'yy' * {n % 999}) }}}}",
        f"{{{{ ([{big}] * {n % 100000})|join('-') }}}}", f"{{{{ '%{n}d' % 1 }}}}",
        f"{{{{ '{{:{n}}}'.format(1) }}}}", f"{{{{ ([{big}] * 50)|tojson(indent={n % 50}) }}}}",
        f"{{{{ {big}|wordwrap(1, wrapstring='--' * {n % 9999}) }}}}",
        f"{{{{ range({n % 100000})|batch({n})|list|length }}}}",
        f"{{{{ 'x'.ljust({n}) }}}}", f"{{{{ ([[{big}]] * {n % 100000})|sum(start=[])|length }}}}",
        f"{{{{ [{big}] * {n % 100} }}}}", f"{{{{ ([{big}] * {n % 100000})|trim|length }}}}",
    ])


def _numbers(rng: random.Random) -> str:
    a = rng.choice(["2", "10", "2**64", "10**100", "-3", "1.5"])
    b = rng.choice(["10", "1000", "100000", "3000000", "0.5"])
    return rng.choice([f"{{{{ {a} ** {b} }}}}", f"{{% set x = ({a} ** {b}) ** {b} %}}ok",
                       f"{{{{ ({a} * {a}) * 10**{b} }}}}", f"{{% set x = {a} ** {b} %}}ok"])


def _recursion(rng: random.Random) -> str:
    return rng.choice([
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}",
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(40) }}",
        "{% for x in [[1], [2]] recursive %}{{ loop([[x]]) }}{% endfor %}",
        "{% set ns = namespace(x=none) %}{% for i in range(99999) %}"
        "{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}",
    ])


_KINDS = [_loops, _growth, _amplify, _numbers, _recursion]
N_CASES = 40


def _fuzz_templates() -> list:
    rng = random.Random(1)
    out = []
    for i in range(N_CASES):
        kind = _KINDS[i % len(_KINDS)]
        template = kind(rng)
        if rng.random() < 0.2:  # two constructs in one template
            template += rng.choice(_KINDS)(rng)
        out.append(pytest.param(template, id=f"{i}-{kind.__name__[1:]}"))
    return out


@pytest.mark.parametrize("template", _fuzz_templates())
def test_template_fuzz_is_bounded(isolated, template):
    outcome = isolated(probes.render, template)
    if outcome.status == "returned":
        assert len(outcome.value) <= MAX_SIZE
    else:
        assert_refused(outcome, "chat template", error="ChatTemplateError")
