"""Long-sequence health of every recurrent preset at its initialisation (issue: models that learn).

For each preset a freshly initialised tiny model reads random byte tokens (B = 1) at each length; the LM loss
is backpropagated. Printed per (preset, length, dtype): whether every gradient is finite, the largest
|gradient| over all parameters, and how alive the memory is at the end: the ratio ||W_T|| / ||W_0|| of the
first Miras layer's final memory to its initial state (a memory that decays to nothing reads only the
residual path). One table, then one JSON line.

    .venv/bin/python bench/stability.py                                  # every preset, T = 1K ... 64K
    .venv/bin/python bench/stability.py --presets yaad --lengths 4096 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from miras_ext.models import PRESETS, MirasForCausalLM, preset
from miras_ext.models.miras_layer import MirasLayer

# The hybrids' Miras layers are the pure models'; their attention layers are no recurrence.
RECURRENT = [p for p in PRESETS if p != "transformer" and not p.endswith("-h")]


def measure(name: str, t: int, dtype: torch.dtype, overrides: dict, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    config = preset(name, "tiny", max_seq_len=max(t, 256), **overrides)
    model = MirasForCausalLM(config)
    layer = next(m for m in model.modules() if isinstance(m, MirasLayer))
    ids = torch.randint(0, config.vocab_size, (1, t))
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        # The first layer's final state, taken from a cached forward of the same tokens.
        out = model(ids, labels=ids, use_cache=True)
    out.loss.backward()
    seconds = time.perf_counter() - start
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    max_grad = max(float(g.abs().max()) for g in grads)
    final = out.cache.layers[next(i for i, b in enumerate(model.blocks) if b.kind == "miras")].memory.memory
    # A zero initial state (matrix memory) has no size to compare with.
    start = math.sqrt(sum(float(w.detach().square().sum()) for w in layer.initial_state) * final[0].shape[0])
    ratio = math.sqrt(sum(float(w.detach().float().square().sum()) for w in final)) / start if start > 0 \
        else float("nan")
    return dict(preset=name, T=t, dtype=str(dtype).replace("torch.", ""), finite=finite,
                loss=float(out.loss.detach()), max_grad=max_grad, memory_ratio=ratio, seconds=round(seconds, 2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=RECURRENT, choices=RECURRENT)
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384, 65536])
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("FIELD", "VALUE"),
                   help="override a MirasConfig field (value parsed as JSON)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, v in args.set}
    rows = []
    print(f"{'preset':<17}{'T':>7} {'dtype':<9}{'finite':>7}{'loss':>9}{'max|grad|':>11}{'||W_T||/||W_0||':>16}"
          f"{'s':>8}")
    for name in args.presets:
        for t in args.lengths:
            for dt in args.dtypes:
                r = measure(name, t, getattr(torch, dt), overrides)
                rows.append(r)
                print(f"{name:<17}{t:>7} {r['dtype']:<9}{str(r['finite']):>7}{r['loss']:>9.3f}{r['max_grad']:>11.3g}"
                      f"{r['memory_ratio']:>16.3g}{r['seconds']:>8.1f}", flush=True)
    print(json.dumps({"bench": "stability", "overrides": overrides, "rows": rows}))


if __name__ == "__main__":
    main()
