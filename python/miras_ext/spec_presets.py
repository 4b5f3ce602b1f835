"""The named memories of docs/math.md Table 1 (Section 6) as MemorySpec fields: the op wrappers
(``moneta_forward``, ...) run them and models/presets.py builds its models from them. Overriding a field
(``MemorySpec(**MONETA, p=2.5)``) gives a variant of the preset."""

# ln_eps, norm_floor and Yaad's eps keep the inner recurrence well-conditioned over long sequences
# (docs/math.md Section 8, point 15).
MONETA = dict(memory="mlp", layers=2, residual_norm=True, ln_eps=1e-2, bias="lp", p=3.0, retention="lq",
              norm_order=4.0, norm_floor=1.0)
YAAD = dict(memory="mlp", layers=2, residual_norm=True, ln_eps=1e-2, bias="yaad", eps=0.1, retention="l2")
MEMORA = dict(memory="mlp", layers=2, residual_norm=True, ln_eps=1e-2, bias="l2", retention="kl", lag_token=True)
TITANS = dict(memory="mlp", layers=2, activation="silu", residual_norm=False, bias="l2", retention="l2",
              algorithm="momentum")
GATED_DELTA = dict(memory="matrix", bias="l2", retention="l2", grad_at_retained=True)
DELTA = dict(memory="matrix", bias="l2", retention="none")
LINEAR_ATTENTION = dict(memory="matrix", bias="dot", retention="none")
