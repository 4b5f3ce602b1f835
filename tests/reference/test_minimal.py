"""reference.minimal, the one-screen statement of the algorithm, against reference.chunked: outputs, final
memory and the gradients of every input (q, k, v, the gates, the initial memory), float64.

The two share no code (minimal imports torch only and takes its inner gradients by torch.func), so a
difference is a bug in one of them. float64: they differ by summation order only (~1e-15); 1e-10 as in
test_equivalence.py.
"""

from __future__ import annotations

import pytest
import torch

from miras_ext.reference import chunked
from miras_ext.reference.minimal import minimal
from miras_ext.spec import MemorySpec

from .helpers import one_thread  # noqa: F401  (autouse fixture)
from .helpers import rel

TOL = 1e-10
B, T, H, D, CHUNK = 2, 11, 2, 4, 4  # T not a multiple of the chunk: the last chunk has 3 tokens
CASES = [  # memory, bias, algorithm
    ("matrix", "l2", "gd"),
    ("matrix", "lp", "momentum"),
    ("matrix", "huber", "gd"),
    ("mlp", "l2", "momentum"),
    ("mlp", "lp", "gd"),
    ("mlp", "huber", "momentum"),
]


def _inputs(memory: str, algorithm: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    shapes = [(D, D)] if memory == "matrix" else [(4 * D, D), (D, 4 * D)]
    x = {
        "q": randn(B, T, H, D), "k": randn(B, T, H, D) / D ** 0.5, "v": randn(B, T, H, D),
        "lr": rand(B, T, H) * 0.5 + 0.1, "alpha": rand(B, T, H) * 0.2 + 0.8,
        "momentum": rand(B, T, H) * 0.9 if algorithm == "momentum" else None,
    }
    for i, shape in enumerate(shapes):
        x[f"w{i}"] = randn(B, H, *shape) / shape[1] ** 0.5
    return {n: t if t is None else t.requires_grad_() for n, t in x.items()}


@pytest.mark.parametrize("memory,bias,algorithm", CASES, ids=["-".join(c) for c in CASES])
def test_minimal_equals_chunked(memory: str, bias: str, algorithm: str) -> None:
    x = _inputs(memory, algorithm, seed=len(memory) + len(bias) + len(algorithm))
    weights = [x[n] for n in sorted(x) if n.startswith("w")]
    residual = memory == "mlp"
    # minibatch: the delta rule (matrix, l2, GD) is exact by default; minimal states the Eq. 5.1 form.
    spec = MemorySpec(memory=memory, bias=bias, p=3.0, retention="l2", algorithm=algorithm,
                      residual_norm=residual, minibatch=(memory, bias, algorithm) == ("matrix", "l2", "gd"))
    delta = torch.full((B, T, H), 0.7, dtype=torch.float64) if bias == "huber" else None
    o_ref, state = chunked(x["q"], x["k"], x["v"], spec, x["lr"], x["alpha"], x["momentum"], delta,
                           initial_state=tuple(weights), output_final_state=True, chunk_size=CHUNK)
    o, z = minimal(x["q"], x["k"], x["v"], x["lr"], x["alpha"], weights, x["momentum"], bias=bias, p=3.0,
                   delta=0.7, residual=residual, chunk_size=CHUNK)
    assert rel(o, o_ref) < TOL
    for a, b in zip(z, state.memory, strict=True):
        assert rel(a, b) < TOL
    # Gradients of one random functional of the output and the final memory.
    gen = torch.Generator().manual_seed(1)
    cot = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    zcot = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in z]
    leaves = [t for t in x.values() if t is not None]

    def grads(out, final):
        total = (out * cot).sum() + sum((f * c).sum() for f, c in zip(final, zcot))
        return torch.autograd.grad(total, leaves)

    for name, a, b in zip([n for n, t in x.items() if t is not None], grads(o, z), grads(o_ref, state.memory)):
        assert rel(a, b) < TOL, name
