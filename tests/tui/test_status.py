"""The status bar's speed figures: labelled with their unit, shown only once measured."""

from diptych.inference.generate import Timings
from diptych.tui.widgets.status import speeds


def test_speeds_are_labelled_and_hidden_until_known():
    timings = Timings(prompt_tokens=82)
    assert speeds(timings) == ""  # nothing measured yet: no "decode 0.0 tok/s"
    timings.prefill_s, timings.generated_tokens = 1.0, 1
    assert speeds(timings) == "prompt 82 tok/s"  # the first token comes from the prompt
    timings.generated_tokens, timings.decode_s = 15, 1.0
    assert speeds(timings) == "prompt 82 tok/s · decode 14.0 tok/s"
