"""A Moneta memory layer forward and backward on the CPU, printing what it computed.

Run with `python -m miras_ext.demo` (the README's first command). The layer is the paper's Moneta mixer in
its simplest form: q, k, v projections (q, k l2-normalised), channel-wise gates from low-rank projections,
a 2-layer MLP memory with residual LayerNorm, the l_3 bias and the l_4 retention (docs/math.md, Section 7),
and an output projection. The memory runs through the compiled op (miras_ext.memory_forward); the demo then
checks it against the pure-PyTorch reference and the exact recurrence.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import miras_ext
from miras_ext.reference import chunked, recurrent
from miras_ext.spec import MemorySpec

MONETA = MemorySpec(memory="mlp", layers=2, expansion=4, activation="gelu", residual_norm=True,
                    bias="lp", p=3.0, retention="lq", norm_order=4.0)


class MonetaDemoLayer(torch.nn.Module):
    def __init__(self, dim: int, heads: int, rank: int = 16):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.gate_down = torch.nn.Linear(dim, rank, bias=False)
        self.gate_up = torch.nn.Linear(rank, 2 * dim)
        with torch.no_grad():  # docs/math.md, Section 8, point 3: alpha starts near 1
            self.gate_up.bias[dim:].fill_(4.0)
        self.out = torch.nn.Linear(dim, dim, bias=False)
        self.initial_state = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(heads, *s) / s[-1] ** 0.5)
            for s in MONETA.weight_shapes(self.head_dim, self.head_dim))

    def forward(self, x: torch.Tensor, chunk_size: int, memory=miras_ext.memory_forward) -> torch.Tensor:
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, self.heads, self.head_dim)  # noqa: E731
        q, k, v = (split(y) for y in self.qkv(x).chunk(3, dim=-1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        lr_logit, alpha_logit = (split(g) for g in self.gate_up(self.gate_down(x)).chunk(2, dim=-1))
        o, _ = memory(q, k, v, MONETA, 0.5 * torch.sigmoid(lr_logit), torch.sigmoid(alpha_logit),
                      initial_state=tuple(self.initial_state), chunk_size=chunk_size)
        return self.out(o.reshape(b, t, -1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    info = miras_ext.build_info()
    print(f"miras_ext: torch {info['torch_running']}, backends {info['backends']}, "
          f"{info['num_threads']} threads")
    layer = MonetaDemoLayer(args.dim, args.heads)
    x = torch.randn(args.batch, args.seq_len, args.dim)
    print(f"Moneta layer: dim {args.dim}, {args.heads} heads of {args.dim // args.heads}, MLP memory "
          f"{[tuple(s) for s in MONETA.weight_shapes(args.dim // args.heads, args.dim // args.heads)]} per head, "
          f"bias l_{MONETA.p:g}, retention l_{MONETA.norm_order:g}, chunk {args.chunk_size}")

    start = time.perf_counter()
    y = layer(x, args.chunk_size)
    loss = y.pow(2).mean()
    loss.backward()
    elapsed = time.perf_counter() - start
    print(f"forward + backward on x {list(x.shape)}: {elapsed * 1e3:.0f} ms; output {list(y.shape)}, "
          f"mean {y.mean():.4f}, std {y.std():.4f}, loss {loss:.5f}")
    for name, p in layer.named_parameters():
        print(f"  grad {name:<18} {list(p.shape)!s:<16} norm {p.grad.norm():.3e}")
    if not all(torch.isfinite(p.grad).all() for p in layer.parameters()):
        raise SystemExit("non-finite gradient")

    start = time.perf_counter()
    y_ref = layer(x, args.chunk_size, memory=chunked)
    y_ref.pow(2).mean().backward()
    ref_time = time.perf_counter() - start
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    print(f"reference.chunked, same layer: {ref_time * 1e3:.0f} ms forward + backward; outputs differ by "
          f"{rel(y.detach(), y_ref.detach()):.1e} (relative)")
    short = x[:, :32]
    with torch.no_grad():
        exact = layer(short, 1, memory=recurrent)
        one = layer(short, 1)
        big = layer(short, 8)
    print(f"first 32 tokens: op with chunk 1 vs the exact recurrence, rel. diff {rel(one, exact):.1e}; "
          f"chunk 8 vs exact {rel(big, exact):.1e} (the mini-batch approximation of docs/math.md Eq. 5.1)")


if __name__ == "__main__":
    main()
