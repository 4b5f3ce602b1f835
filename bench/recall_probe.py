"""The memory's own recall, before any outer training: which inner step eta lets each preset's op store
associations (docs/models.md, "The memories' own recall at init").

Per preset spec (spec_presets.py: MONETA, YAAD, MEMORA, TITANS, GATED_DELTA), one head of D = 32 (expansion 4
for the MLP memories, initial weights N(0, 1/fan_in) as the models start), N random pairs (l2-normalised k,
v of norm `--v-norm`) are written with step eta and no forgetting (alpha = 1; Titans' momentum 0.5, Yaad's
delta 1), then read at q = k_i with eta = 0 (no writes). Recall: the share of reads whose nearest stored
value (cosine) is v_i; error: ||o - v|| / ||v||. Exact recurrence (chunk 1), float32, 16 sequences.

A model can only learn MQAR once its gates reach an eta where its memory recalls; the printed "init" eta is
the one the preset's freshly built model starts with (models.describe.initial_gates).

    .venv/bin/python bench/recall_probe.py                      # N = 8 pairs
    .venv/bin/python bench/recall_probe.py --pairs 16 --v-norm 5.66
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import miras_ext
from miras_ext import MemorySpec
from miras_ext.models.describe import initial_gates
from miras_ext.spec_presets import GATED_DELTA, MEMORA, MONETA, TITANS, YAAD

SPECS = {"moneta": MONETA, "yaad": YAAD, "memora": MEMORA, "titans": TITANS, "gated-deltanet": GATED_DELTA}
D, E, B = 32, 4, 16


def recall(spec: MemorySpec, eta: float, pairs: int, v_norm: float, seed: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(B, pairs, 1, D, generator=gen), dim=-1)
    v = F.normalize(torch.randn(B, pairs, 1, D, generator=gen), dim=-1) * v_norm
    init = None if spec.memory == "matrix" else tuple(
        torch.randn(1, *s, generator=gen) / s[-1] ** 0.5 for s in spec.weight_shapes(D, D))
    kk, vv = torch.cat([k, k], 1), torch.cat([v, v], 1)
    lr = torch.cat([torch.full((B, pairs, 1), eta), torch.zeros(B, pairs, 1)], 1)
    ones = torch.ones(B, 2 * pairs, 1)
    alpha = ones if spec.retention != "none" else None
    momentum = ones * 0.5 if spec.algorithm == "momentum" else None
    delta = ones if spec.bias == "yaad" else None
    o, _ = miras_ext.memory_forward(kk, kk, vv, spec, lr, alpha, momentum, delta, initial_state=init, chunk_size=1)
    o = o[:, pairs:]
    sim = torch.einsum("bthd,bshd->bhts", F.normalize(o, dim=-1), F.normalize(v, dim=-1))
    acc = (sim.argmax(-1) == torch.arange(pairs)).float().mean().item()
    return acc, ((o - v).norm() / v.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--v-norm", type=float, default=1.0)
    ap.add_argument("--etas", type=float, nargs="+", default=[1e-3, 1e-2, 0.05, 0.1, 0.3, 1.0, 3.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"recall of {args.pairs} pairs (chance {100 / args.pairs:.1f}%), |v| = {args.v_norm:g}")
    print(f"{'preset':<16}{'init eta':>9} " + " ".join(f"{e:>8g}" for e in args.etas))
    for name, fields in SPECS.items():
        spec = MemorySpec(**fields, expansion=E) if fields["memory"] == "mlp" else MemorySpec(**fields)
        cells = [recall(spec, eta, args.pairs, args.v_norm, args.seed) for eta in args.etas]
        init_eta = initial_gates(name)["lr"][0]  # the eta a freshly built tiny model starts with
        rows.append({"preset": name, "init_eta": init_eta,
                     "recall": {str(e): c[0] for e, c in zip(args.etas, cells)},
                     "error": {str(e): c[1] for e, c in zip(args.etas, cells)}})
        print(f"{name:<16}{init_eta:>9.3g} " + " ".join(f"{100 * c[0]:>7.0f}%" for c in cells), flush=True)
    print("JSON " + json.dumps({"bench": "recall_probe", "pairs": args.pairs, "v_norm": args.v_norm, "rows": rows}))


if __name__ == "__main__":
    main()
