"""A Jinja2 sandbox whose templates cannot hang, exhaust memory or print without bound.

jinja2's `ImmutableSandboxedEnvironment` stops a template from reaching Python internals or
mutating its inputs, but not from costing: two nested loops over `range(99999)`, a string
doubled forty times or `(2**1000)**1000**...` each run for minutes or take gigabytes. Templates
come from model files, so `BoundedSandbox` also bounds what one render may cost:

* steps: every loop iteration, call, filter, attribute or item lookup, operator and printed
  value is one step; at most `MAX_STEPS` per render, and at most `MAX_SECONDS` of wall time
  (checked at each step, so it holds in any thread: no signals);
* size: no string, list or dict larger than `MAX_SIZE` characters or items is built, and no
  integer wider than `MAX_INT_BITS` bits. Operations that can make a large value out of small
  ones in one call (`*`, `**`, `%`, `str.format`, `center`, `indent`, `replace`, `join`,
  `wordwrap`, `tojson`, printing a list, ...) are refused before they run when their result
  could exceed the limit; every other result is measured after;
* total: the values built during one render add up to at most `MAX_BUILT` characters or
  items, and the rendered text to at most `MAX_SIZE` characters (`bounded_render`).

Past a limit, rendering stops with a `ChatTemplateError` that names the limit and the construct.
The budget lives in a thread-local, so renders in several threads are independent.
"""

from __future__ import annotations

import re
import string
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import wraps
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Cycler, Joiner, Namespace

from diptych.errors import ChatTemplateError

__all__ = ["BoundedSandbox", "bounded_render", "MAX_STEPS", "MAX_SECONDS", "MAX_SIZE", "MAX_BUILT", "MAX_INT_BITS"]

MAX_STEPS = 1_000_000     # loop iterations, calls, filters, lookups, operators, printed values
MAX_SECONDS = 5.0         # wall time of one render
MAX_SIZE = 8_000_000      # characters of a string or of the output; items of a list or dict
MAX_BUILT = 64_000_000    # characters and items of all values one render builds
MAX_INT_BITS = 4096       # width of any integer a template computes


class _Budget:
    """What one render has spent."""

    def __init__(self) -> None:
        self.steps = 0
        self.built = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def step(self, what: str) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise ChatTemplateError(f"the chat template exceeded its limit of {MAX_STEPS:,} "
                                    f"steps (at {what})")
        if self.steps & 63 == 0 and time.monotonic() > self.deadline:
            raise ChatTemplateError(f"the chat template ran past its time limit of "
                                    f"{MAX_SECONDS:g} s (at {what})")

    def allow(self, size: int, what: str) -> None:
        """Refuse before building a value of about `size` characters or items."""
        if size > MAX_SIZE:
            raise ChatTemplateError(f"the chat template would build a value of {size:,} "
                                    f"characters or items with {what}; the limit is "
                                    f"{MAX_SIZE:,}")

    def made(self, value: Any, what: str) -> Any:
        """Measure a value just built; return it."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > MAX_INT_BITS:
                raise ChatTemplateError(f"the chat template computed a {value.bit_length():,}-"
                                        f"bit integer with {what}; the limit is "
                                        f"{MAX_INT_BITS:,} bits")
            return value
        self.count(_shallow_size(value), what)
        return value

    def count(self, size: int, what: str) -> None:
        """Add a value of `size` characters or items to what this render has built."""
        self.allow(size, what)
        self.built += size
        if self.built > MAX_BUILT:
            raise ChatTemplateError(f"the chat template built more than {MAX_BUILT:,} "
                                    f"characters and items in all (at {what})")


_local = threading.local()


def _budget() -> _Budget:
    budget = getattr(_local, "budget", None)
    if budget is None:  # outside a render: jinja's compile-time constant folding, which
        raise RuntimeError("no render in progress")  # then leaves the node to run time
    return budget


@contextmanager
def _render_budget():
    previous = getattr(_local, "budget", None)
    _local.budget = _Budget()
    try:
        yield _local.budget
    finally:
        _local.budget = previous


def _shallow_size(value: Any) -> int:
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    return 1


def _printed_size(value: Any, extra_per_item: int = 0) -> int:
    """An upper estimate of len(str(value)) (each item of a container counts
    `extra_per_item` more per level of nesting, for JSON indentation). The count stops
    soon after it passes MAX_SIZE, so a large or self-containing value ends quickly."""
    total, stack = 0, [iter([value])]
    while stack and total <= MAX_SIZE:
        v = next(stack[-1], _END)
        if v is _END:
            stack.pop()
            continue
        total += extra_per_item * (len(stack) - 1)
        if isinstance(v, (str, bytes)):
            total += len(v) + 2
        elif isinstance(v, int) and not isinstance(v, bool):
            total += v.bit_length() // 3 + 2
        elif isinstance(v, Mapping):
            total += 2 + 4 * len(v)
            stack.append(x for kv in v.items() for x in kv)
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.append(iter(v))
        elif isinstance(v, (Namespace, Cycler, Joiner)):
            total += 16
            stack.append(iter(vars(v).values()))
        else:
            total += 32
    return total


_END = object()


def _format_widths(fmt: str, style: str) -> int:
    """Characters the widths and precisions of a format string may add ("%" or "{}");
    a width taken from the arguments (`*`, a nested field) is refused."""
    if style == "%":
        specs = re.findall(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d*)(?:\.(\*|\d*))?", fmt)
        numbers = [n for spec in specs for n in spec]
    else:
        numbers = []
        try:
            fields = list(string.Formatter().parse(fmt))
        except ValueError:
            return 0  # str.format raises the same error itself
        for _, _, spec, _ in fields:
            if spec and "{" in spec:
                numbers.append("*")
            numbers += re.findall(r"\d+", spec or "")
    if "*" in numbers:
        raise ChatTemplateError("the chat template takes a format width from an argument; "
                                "only literal widths are allowed")
    return sum(int(n) for n in numbers if n)


def _materialized(value: Any) -> Any:
    """An iterator (from `map`, `select`, ...) as a list, counted as it is drawn."""
    if isinstance(value, (str, bytes, Mapping, list, tuple)) or not isinstance(value, Iterable):
        return value
    budget, items = _budget(), []
    for item in value:
        budget.step("an iterator")
        items.append(item)
        budget.allow(len(items), "an iterator")
    return items


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _len_str(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes)) else _printed_size(value)


def _join_size(items: Any, sep: Any) -> int:
    n = len(items) if isinstance(items, (list, tuple, str, bytes, Mapping)) else 1
    return _printed_size(items) + _len_str(sep) * n


def _replace_size(s: Any, old: Any, new: Any, count: Any = None) -> int:
    s, old = str(s), str(old)
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * _len_str(new)


def _indent_size(s: Any, width: Any = 4, *_: Any, **__: Any) -> int:
    pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    s = str(s)
    return len(s) + (s.count("\n") + 1) * pad


def _tojson_size(value: Any, *args: Any, **kwargs: Any) -> int:
    indent = _arg(args, kwargs, 1, "indent")
    pad = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    return _printed_size(value, extra_per_item=pad + 8)


def _sum_size(items: Any, start: Any) -> int:
    """Summing sequences copies the running total at each item: count that work."""
    if isinstance(start, (int, float)):
        return 1
    return (len(items) + 1) * (sum(_shallow_size(x) for x in items) + _shallow_size(start))


def _percent_size(fmt: Any, values: Any) -> int:
    return len(str(fmt)) + _format_widths(str(fmt), "%") + _printed_size(values)


# filter name -> estimate(args, kwargs) of the characters or items it produces, for the
# filters that can make a large value out of small ones (the rest are measured after)
_FILTER_SIZE = {
    "center": lambda a, k: max(_len_str(a[0]), _arg(a, k, 1, "width", 80)),
    "indent": lambda a, k: _indent_size(*a, **k),
    "replace": lambda a, k: _replace_size(*a, **k),
    "join": lambda a, k: _join_size(a[0], _arg(a, k, 1, "d", "")),
    "wordwrap": lambda a, k: _len_str(a[0]) * (1 + len(str(_arg(a, k, 3, "wrapstring")
                                                          or "\n"))),
    "tojson": lambda a, k: _tojson_size(*a, **k),
    "format": lambda a, k: _percent_size(a[0], (a[1:], k)),
    "sum": lambda a, k: _sum_size(a[0], _arg(a, k, 2, "start", 0)),
    "string": lambda a, k: _printed_size(a[0]),
    "pprint": lambda a, k: _printed_size(a[0], extra_per_item=4),
    "xmlattr": lambda a, k: 2 * _printed_size(a[0]),
    "urlencode": lambda a, k: 3 * _printed_size(a[0]),
    "urlize": lambda a, k: _len_str(a[0]) * (4 + sum(_len_str(v) for v in (*a[1:], *k.values())
                                                     if isinstance(v, str))),
}

# the same for str (and bytes) methods a template calls
_METHOD_SIZE = {
    "center": lambda s, a, k: max(len(s), _arg(a, k, 0, "width", 0)),
    "ljust": lambda s, a, k: max(len(s), _arg(a, k, 0, "width", 0)),
    "rjust": lambda s, a, k: max(len(s), _arg(a, k, 0, "width", 0)),
    "zfill": lambda s, a, k: max(len(s), _arg(a, k, 0, "width", 0)),
    "expandtabs": lambda s, a, k: len(s) + s.count("\t" if isinstance(s, str) else b"\t")
    * _arg(a, k, 0, "tabsize", 8),
    "replace": lambda s, a, k: _replace_size(s, *a, **k),
    "join": lambda s, a, k: _join_size(a[0], s),
    "translate": lambda s, a, k: len(s) * max(
        (_len_str(v) for v in a[0].values()), default=1) if isinstance(a[0], Mapping)
    else len(s),
}

# filters that turn their input into text first (str() of a list may be far larger)
_TEXT_FILTERS = frozenset(["capitalize", "center", "e", "escape", "forceescape", "format",
                           "indent", "lower", "replace", "safe", "striptags", "title", "trim",
                           "truncate", "upper", "urlize", "wordcount", "wordwrap"])

_SIZE_ARGS = frozenset(["center", "ljust", "rjust", "zfill", "expandtabs", "indent", "batch",
                        "slice", "truncate", "wordwrap", "round", "random"])


def _check_numbers(args: tuple, kwargs: dict, what: str) -> None:
    """Widths, counts and precisions given to a filter or a string method stay below the
    size limit (they set how much is built or how long a loop runs)."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_SIZE:
            raise ChatTemplateError(f"the chat template passes {v} to {what}; numbers given "
                                    f"to it are limited to {MAX_SIZE:,}")


def _guard_filter(name: str, fn):
    estimate = _FILTER_SIZE.get(name)
    n_context = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0
    what = f"the filter {name!r}"

    @wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step(what)
        head, values = args[:n_context], args[n_context:]
        if name in _SIZE_ARGS:
            _check_numbers(values[1:], kwargs, what)
        if name in _TEXT_FILTERS and values and not isinstance(values[0], str):
            budget.allow(_printed_size(values[0]), what)
        if values and estimate is not None:
            values = (_materialized(values[0]), *values[1:])
            budget.allow(estimate(values, kwargs), what)
        return budget.made(fn(*head, *values, **kwargs), what)

    return guarded


def _guard_iteration(iterable: Any) -> Iterator:
    """Every loop's iterable: each iteration is a step."""
    budget = _budget()
    for item in iterable:
        budget.step("a for loop")
        yield item


def _guard_concat(value: Any) -> Any:
    """Every operand of `~`, which turns it into text."""
    return _guard_text(value, "the operator '~'")


def _guard_output(value: Any) -> Any:
    """Every printed value (the environment's finalize)."""
    return _guard_text(value, "printing a value")


def _guard_text(value: Any, what: str) -> Any:
    budget = _budget()
    budget.step(what)
    budget.count(len(value) if isinstance(value, str) else _printed_size(value), what)
    return value


_GUARDS = (_guard_iteration, _guard_concat)


def _int_bits(op: str, left: int, right: int) -> int:
    """The width of `left op right` for two integers, before computing it."""
    if op == "*":
        return left.bit_length() + right.bit_length()
    if op == "**":
        if right < 0 or abs(left) < 2:
            return 1
        return right * left.bit_length()  # right may be huge: no conversion to float
    return max(left.bit_length(), right.bit_length()) + 1


class _CodeGenerator(CodeGenerator):
    """jinja2's code generator with every loop's iterable and every `~` operand passed
    through the environment's guards."""

    def visit_For(self, node: nodes.For, frame) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("guard_iteration"), [node.iter], [],
                               None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        node.nodes = [nodes.Call(nodes.EnvironmentAttribute("guard_concat"), [n], [], None,
                                 None, lineno=node.lineno) for n in node.nodes]
        super().visit_Concat(node, frame)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """An immutable sandbox with the limits of this module; render with `bounded_render`."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])

    guard_iteration = staticmethod(_guard_iteration)
    guard_concat = staticmethod(_guard_concat)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, finalize=_guard_output, **kwargs)
        del self.globals["lipsum"]  # n paragraphs of filler text: nothing a chat needs
        self.filters = {name: _guard_filter(name, fn) for name, fn in self.filters.items()}

    def add_filter(self, name: str, fn) -> None:
        self.filters[name] = _guard_filter(name, fn)

    # -- sandbox hooks -------------------------------------------------------------------
    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().step(f"the attribute {attribute!r}")
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().step("an item lookup")
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if __obj in _GUARDS:  # the generated code's own calls
            return __obj(*args)
        name = getattr(__obj, "__name__", type(__obj).__name__)
        what = f"a call of {name!r}"
        budget = _budget()
        budget.step(what)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes)):
            _check_numbers(args, kwargs, what)
            estimate = _METHOD_SIZE.get(name)
            if estimate is not None:
                if name == "join":
                    args = (_materialized(args[0]), *args[1:]) if args else args
                budget.allow(estimate(owner, args, kwargs), what)
        for v in (*args, *kwargs.values()):
            budget.allow(_shallow_size(v), what)
        return budget.made(super().call(__context, __obj, *args, **kwargs), what)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        what = f"the operator {operator!r}"
        budget = _budget()
        budget.step(what)
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        if ints and _int_bits(operator, left, right) > MAX_INT_BITS:
            raise ChatTemplateError(f"the chat template would compute an integer wider than "
                                    f"{MAX_INT_BITS:,} bits with {what}")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(count, int):
                    budget.allow(len(seq) * count, what)
        elif operator == "%" and isinstance(left, str):
            budget.allow(_percent_size(left, right), what)
        elif operator == "+":
            budget.allow(_shallow_size(left) + _shallow_size(right), what)
        return budget.made(super().call_binop(context, operator, left, right), what)

    def wrap_str_format(self, value: Any):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        @wraps(wrapped)
        def checked(*args: Any, **kwargs: Any) -> str:
            size = len(fmt) + _format_widths(fmt, "{}") + _printed_size((args, kwargs))
            _budget().allow(size, "str.format")
            return wrapped(*args, **kwargs)

        return checked


def bounded_render(template, **variables: Any) -> str:
    """Render a template compiled by a BoundedSandbox within the limits of this module."""
    out, size = [], 0
    with _render_budget() as budget:
        for piece in template.generate(**variables):
            size += len(piece)
            if size > MAX_SIZE:
                raise ChatTemplateError(f"the chat template's output exceeds its limit of "
                                        f"{MAX_SIZE:,} characters")
            budget.step("the output")
            out.append(piece)
    return "".join(out)
