"""Time per decoded token at a short and a long context: a pure Miras model (constant-size state) against
Transformer++ (a KV cache that grows with the context). CPU, small dimensions, a few minutes on 2 cores.

    .venv/bin/python bench/decode.py                          # yaad vs transformer at contexts 1K and 16K
    .venv/bin/python bench/decode.py --models yaad gated-deltanet transformer --contexts 1024 4096 16384

For each (model, context): one chunked prefill of `context` random tokens with the cache (timed, reported
as tokens/s), then `--warmup` decode steps and `--steps` timed single-token steps on that cache; the median
step is the per-token cost. Dimensions: the "tiny" preset widened by --dim/--layers/--heads (default 256 x 4,
4 heads). The last line printed is `JSON {...}` with every number.

Threads: --threads 1 by default, so that other load on a small shared machine does not make every OpenMP
region of a step wait for a second core (the memory op itself runs a decoding step on the calling thread).
Yaad is the default Miras model
because its prefill uses the dual-form read (Eq. 5.10); Moneta and Memora (nonlinear links) materialise
the weights per token (Eq. 5.11) and prefill 16K tokens about 20x slower; their decode step costs the same.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from miras_ext.models import MirasForCausalLM, preset


def bench(name: str, context: int, args) -> dict:
    torch.manual_seed(0)
    cfg = preset(name, "tiny", dim=args.dim, n_layers=args.layers, n_heads=args.heads, mlp_hidden=None,
                 max_seq_len=max(args.contexts) + args.steps + args.warmup + 1)
    model = MirasForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, context))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            out = model(token, cache=cache, use_cache=True)
            dt = time.perf_counter() - t0
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            if i >= args.warmup:
                times.append(dt)
    return dict(model=name, context=context, ms_per_token=1e3 * statistics.median(times),
                ms_per_token_min=1e3 * min(times), prefill_tokens_per_s=context / prefill_s,
                cache_mib=cache.nbytes() / 2**20, parameters=model.num_parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["yaad", "transformer"])
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 16384])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(m, c, args) for m in args.models for c in args.contexts]
    print(f"{'model':<16}{'context':>9}{'ms/token':>10}{'min ms':>9}{'prefill tok/s':>15}{'cache MiB':>11}")
    for r in rows:
        print(f"{r['model']:<16}{r['context']:>9}{r['ms_per_token']:>10.3f}{r['ms_per_token_min']:>9.3f}"
              f"{r['prefill_tokens_per_s']:>15.0f}{r['cache_mib']:>11.2f}")
    ratios = {}
    for m in args.models:
        by = {r["context"]: r["ms_per_token"] for r in rows if r["model"] == m}
        ratios[m] = by[max(by)] / by[min(by)]
        print(f"{m}: per-token cost at {max(by)} / at {min(by)} = {ratios[m]:.2f}")
    info = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                cores=os.cpu_count(), dim=args.dim, layers=args.layers, heads=args.heads, steps=args.steps)
    print("JSON " + json.dumps(dict(rows=rows, ratio_long_over_short=ratios, setup=info)))


if __name__ == "__main__":
    main()
