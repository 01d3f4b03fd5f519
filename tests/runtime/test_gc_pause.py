"""The cyclic GC paused over loading: back on afterwards, even after an error, and left off
when the caller had turned it off."""

import gc

import pytest

import diptych
from diptych.gc_pause import gc_paused


def test_paused_then_restored():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()   # the inner block does not turn it on under the outer
    assert gc.isenabled()
    with pytest.raises(ValueError), gc_paused():
        raise ValueError
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()   # the caller's choice stands
    finally:
        gc.enable()


def test_load_and_a_first_step_leave_the_collector_on(smollm2_path, tmp_path):
    model = diptych.load(smollm2_path, n_ctx=64)
    assert gc.isenabled()
    model.generate("hi", max_tokens=2, temperature=0)
    assert gc.isenabled()
    with pytest.raises(diptych.DiptychError):
        diptych.load(tmp_path / "missing.gguf")
    assert gc.isenabled()
