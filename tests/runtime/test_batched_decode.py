"""Several sequences' decode steps run as one forward (`Engine.decode_rows`) equal each
sequence decoded alone, on every cache kind (full, wrapped ring, MLA) and every backend."""

import numpy as np
import pytest

from diptych.errors import InvalidArgumentError
from diptych.load_plan import LoadPlan

from .test_graph_oracle import IDS, tiny  # noqa: F401 (a fixture)
from .test_sequences import backend  # noqa: F401 (a fixture)

PROMPTS = [IDS[:5], IDS[3:23], IDS[:1], IDS[7:36]]   # different lengths: different positions


@pytest.mark.parametrize("family", ["llama", "gemma3", "deepseek_v2"])
def test_decode_rows_equals_each_sequence_alone(tiny, backend, family):
    if type(backend).__name__ == "CudaBackend" and family != "llama":
        # rows reach the backend's own attention, checked per cache kind in test_sequences;
        # under the Triton interpreter each family costs ~40 s
        pytest.skip("one family on the CUDA backend")
    _, path, _ = tiny(family)
    eng = LoadPlan.open(path, backend, n_ctx=64, n_batch=8).engine()
    together = [eng.main] + [eng.open_sequence() for _ in PROMPTS[1:]]
    alone = [eng.open_sequence() for _ in PROMPTS]
    nxt = [None] * len(PROMPTS)
    for seqs in (together, alone):
        for seq, prompt in zip(seqs, PROMPTS):
            seq.prefill(prompt)
    tokens = [11, 12, 13, 14]
    for step in range(3):    # the longer prompts have wrapped the tiny gemma3's rings already
        rows = backend.to_numpy(eng.decode_rows(together, tokens))
        for b, seq in enumerate(alone):
            ref = backend.to_numpy(seq.eval([tokens[b]]))[0]
            assert np.abs(rows[b] - ref).max() <= 1e-4 * np.abs(ref).max(), (step, b)
            nxt[b] = int(np.argmax(rows[b]))
        tokens = nxt[:]
    for a, b in zip(together, alone):
        assert a.tokens == b.tokens


def test_decode_rows_needs_one_token_per_distinct_sequence(tiny, backend):
    _, path, _ = tiny("llama")
    eng = LoadPlan.open(path, backend, n_ctx=16, n_batch=4).engine()
    eng.main.prefill([1, 2])
    with pytest.raises(InvalidArgumentError):
        eng.decode_rows([eng.main, eng.main], [3, 4])
    with pytest.raises(InvalidArgumentError):
        eng.decode_rows([eng.main], [3, 4])
