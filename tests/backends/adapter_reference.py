"""`linear` with LoRA adapters against a dense float64 reference: the output and the
gradients of sum(y * g) with respect to x and each pair's A and B."""

import numpy as np
import torch
import torch.nn.functional as F

from diptych.backends.base import LoRA

GRAD_OF = ("x", "a1", "b1", "a2", "b2")


def adapter_case(n: int, k: int, seed: int = 0):
    """Random non-zero float64 inputs for a weight (n, k): x (2, 3, k), a rank-4 pair over
    all n rows (scale 0.5), a rank-2 pair on rows [n/4, n/2) as an adapter on one part of a
    stacked matrix (scale 2), and an output cotangent g. -> (arrays, [(scale, rows)] * 2)."""
    rng = np.random.default_rng(seed)
    r0, r1 = n // 4, n // 2
    shapes = dict(x=(2, 3, k), a1=(4, k), b1=(n, 4), a2=(2, k), b2=(r1 - r0, 2), g=(2, 3, n))
    case = {name: rng.standard_normal(s) * (1.0 if name in "xg" else 0.1)
            for name, s in shapes.items()}
    return case, [(0.5, None), (2.0, (r0, r1))]


def reference(case: dict, w: np.ndarray, pairs: list) -> tuple[np.ndarray, dict]:
    """y = x W^T + sum scale (x A^T) B^T (each on its rows) and the gradients, in float64."""
    t = {name: torch.tensor(v, dtype=torch.float64, requires_grad=name != "g")
         for name, v in case.items()}
    y = t["x"] @ torch.tensor(w, dtype=torch.float64).T
    for (scale, rows), a, b in zip(pairs, (t["a1"], t["a2"]), (t["b1"], t["b2"])):
        delta = (t["x"] @ a.T) @ b.T * scale
        y = y + (delta if rows is None else F.pad(delta, (rows[0], y.shape[-1] - rows[1])))
    (y * t["g"]).sum().backward()
    return y.detach().numpy(), {name: t[name].grad.numpy() for name in GRAD_OF}


def assert_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= rel * np.abs(want).max()


def check_torch_backend(be, qt, w: np.ndarray) -> None:
    """A torch backend's `linear(x, prepare(qt), adapter=...)` in fp32 and its gradients
    against the reference on `w`, the weight's exact values; the base gets no gradient."""
    case, pairs = adapter_case(*qt.shape)
    want, want_grads = reference(case, w, pairs)
    t = {name: torch.tensor(v, dtype=torch.float32, device=be.device,
                            requires_grad=name != "g") for name, v in case.items()}
    adapter = [LoRA(t["a1"], t["b1"], pairs[0][0]), LoRA(t["a2"], t["b2"], *pairs[1])]
    base = be.prepare(qt)
    y = be.linear(t["x"], base, adapter=adapter)
    (y * t["g"]).sum().backward()
    assert_close(be.to_numpy(y), want)
    for name in GRAD_OF:
        assert_close(be.to_numpy(t[name].grad), want_grads[name])
    # the base's tensors, where it holds any (the CPU's quantized blocks are numpy arrays)
    held = [v for v in vars(base).values() if isinstance(v, torch.Tensor)]
    held += list(getattr(base, "planes", {}).values())
    assert all(not v.requires_grad and v.grad is None for v in held)
