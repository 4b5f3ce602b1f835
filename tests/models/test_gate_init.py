"""Every gate of a freshly built model starts at the value docs/models.md ("What every preset starts with")
documents, for every preset, at the tiny and 170M sizes, and through the Hugging Face construction paths.

The documented values are written out here as numbers, not recomputed from the layer's code, so that a
change of the initialisation (or a bug that undoes it, as the reset order once did) fails this test."""

from __future__ import annotations

import math

import pytest
import torch

from miras_ext import reference
from miras_ext.models import PRESETS, MirasForCausalLM, preset
from miras_ext.models.miras_layer import MirasLayer

# The documented start of each gate at x = 0 (the gate projections' biases alone; docs/models.md).
SIGMOID_ALPHA = 1 / (1 + math.exp(-4.0))             # alpha = sigmoid(4) = 0.982
DT_RANGE = (1e-3, 1e-1)                               # dt_h log-uniform over the heads (Mamba2)
A_RANGE = (1.0, 16.0)                                 # A_h = exp(A_log_h) linear over the heads


def miras_layers(model) -> list[MirasLayer]:
    return [m for m in model.modules() if isinstance(m, MirasLayer)]


def documented(name: str, size: str, h: int) -> dict[str, torch.Tensor | float | None]:
    """The documented value of each gate at x = 0 for preset `name` with h heads (a float means: every
    channel and head; a tensor: one value per head)."""
    config = preset(name, size)
    spec = config.memory
    heads = torch.arange(h, dtype=torch.float64)
    dt = torch.exp(torch.linspace(math.log(DT_RANGE[0]), math.log(DT_RANGE[1]), h, dtype=torch.float64))
    out: dict = {"lr": None, "alpha": None, "momentum": None, "delta": None}
    if config.lr_gate == "sigmoid":
        out["lr"] = config.lr_max * 0.5
    elif config.lr_gate == "one":
        out["lr"] = 1.0
    else:
        out["lr"] = dt
    if spec.has_retention_gate:
        if config.alpha_gate == "sigmoid":
            out["alpha"] = SIGMOID_ALPHA
        elif config.alpha_gate == "fixed":
            out["alpha"] = 1 - 2.0 ** (-5.0 - heads)
        else:
            out["alpha"] = torch.exp(-torch.linspace(*A_RANGE, h, dtype=torch.float64) * dt)
    if spec.algorithm == "momentum":
        out["momentum"] = 0.5
    if spec.uses_threshold:
        out["delta"] = 1.0
    return out


def check_layer(layer: MirasLayer, want: dict, where: str) -> None:
    x = torch.zeros(1, 1, layer.config.dim)
    got = dict(zip(("lr", "alpha", "momentum", "delta"), layer.gates(x)))
    h = layer.config.n_heads
    for gate, value in want.items():
        if value is None:
            assert got[gate] is None, f"{where}: {gate} should not exist"
            continue
        g = got[gate].double().reshape(h, -1)  # [B=1, T=1, H(, D)] -> one row per head
        expect = (torch.full((h, 1), value, dtype=torch.float64) if isinstance(value, float)
                  else value.reshape(h, 1)).expand_as(g)
        err = ((g - expect).norm() / expect.norm()).item()
        assert err < 1e-6, f"{where}: {gate} at init is {g[:, 0].tolist()}, documented {expect[:, 0].tolist()}"


@pytest.mark.parametrize("size", ["tiny", "170M"])
@pytest.mark.parametrize("name", PRESETS)
def test_fresh_model_gates_are_the_documented_ones(name, size):
    config = preset(name, size)
    if size != "tiny":
        # The gates of one block repeat in every block, and the vocabulary does not touch them.
        config = config.replace(n_layers=2, mixers=config.mixers[:2], vocab_size=256)
    torch.manual_seed(0)
    model = MirasForCausalLM(config)
    layers = miras_layers(model)
    assert bool(layers) == (name != "transformer")
    for i, layer in enumerate(layers):
        check_layer(layer, documented(name, size, config.n_heads), f"{name} {size} layer {i}")


def test_delta_init_is_the_threshold_at_init():
    config = preset("yaad", delta_init=4.0)
    want = documented("yaad", "tiny", config.n_heads) | {"delta": 4.0}
    for i, layer in enumerate(miras_layers(MirasForCausalLM(config))):
        check_layer(layer, want, f"yaad delta_init=4 layer {i}")
    with pytest.raises(ValueError, match="delta_init: expected a finite number > 0"):
        preset("yaad", delta_init=0.0)


@pytest.mark.parametrize("name", ["moneta", "yaad", "memora", "moneta-matrix", "gated-deltanet", "titans", "retnet", "mamba2"])
def test_gates_on_real_inputs_stay_near_their_start(name):
    """The low-rank projections add little to the biases at init (weights N(0, 0.02)): on embedded random
    tokens every lr is within 5% of its documented start and every decay rate -log(alpha) within 10%."""
    torch.manual_seed(0)
    config = preset(name)
    model = MirasForCausalLM(config)
    layer = miras_layers(model)[0]
    x = model.blocks[0].mixer_norm(model.embed(torch.randint(0, 256, (4, 32))))
    lr, alpha, _, _ = layer.gates(x)
    want = documented(name, "tiny", config.n_heads)
    h = config.n_heads
    if isinstance(want["lr"], float):
        assert ((lr - want["lr"]).abs() <= 0.05 * want["lr"]).all()
    if want["alpha"] is not None:
        start = want["alpha"] if isinstance(want["alpha"], float) else want["alpha"].float()
        shaped = torch.as_tensor(start).reshape(-1, 1) if not isinstance(start, float) else start
        a = alpha.reshape(-1, h, alpha.shape[-1] if alpha.dim() == 4 else 1).transpose(0, 1).reshape(h, -1)
        rate, want_rate = -a.log(), -torch.as_tensor(shaped).log()
        assert ((rate - want_rate).abs() <= 0.1 * want_rate).all(), f"{name}: alpha {a.min()}..{a.max()} far from {start}"


def test_hugging_face_paths_build_the_documented_gates(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from miras_ext.models.hf import MirasHFConfig, MirasHFForCausalLM
    for name in ("yaad", "gated-deltanet", "retnet", "titans"):
        want = documented(name, "tiny", preset(name).n_heads)
        config = MirasHFConfig.from_preset(name, "tiny")
        for how, model in (("from_preset", MirasHFForCausalLM.from_preset(name, "tiny")),
                           ("from_config", AutoModelForCausalLM.from_config(config))):
            for layer in miras_layers(model):
                check_layer(layer, want, f"{name} {how}")
        saved = MirasHFForCausalLM.from_preset(name, "tiny")
        saved.save_pretrained(tmp_path / name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        for layer in miras_layers(loaded):
            check_layer(layer, want, f"{name} from_pretrained")


# The documented initial memory state (docs/models.md, "What every preset starts with"): the presets whose
# MLP memory starts empty, its last layer zero; every other MLP layer N(0, 1/fan_in); matrices zero.
ZERO_LAST = {"moneta", "moneta-h", "yaad", "yaad-h", "memora", "memora-h", "titans"}


@pytest.mark.parametrize("name", PRESETS)
def test_fresh_model_initial_state_is_the_documented_one(name):
    torch.manual_seed(0)
    config = preset(name)
    for i, layer in enumerate(miras_layers(MirasForCausalLM(config))):
        weights = list(layer.initial_state)
        for j, w in enumerate(weights):
            where = f"{name} layer {i} weight {j}"
            if config.memory.memory != "mlp" or (name in ZERO_LAST and j == len(weights) - 1):
                assert torch.count_nonzero(w) == 0, f"{where}: expected zeros"
            else:
                std = w.detach().std().item() * w.shape[-1] ** 0.5  # N(0, 1/fan_in): 1 after scaling
                assert 0.9 < std < 1.1, f"{where}: std * sqrt(fan_in) = {std:.3f}, expected 1"


@pytest.mark.parametrize("name", ["moneta", "memora"])
def test_an_empty_residual_memory_reads_its_query(name):
    """With the last layer zero, x + LN(f(x)) reads x (LN(0) = 0; for Memora's KL link zero logits are
    uniform rows, f(x) is the same in every channel and LN of a constant is 0) until the first write."""
    torch.manual_seed(0)
    layer = miras_layers(MirasForCausalLM(preset(name)))[0]
    q = torch.nn.functional.normalize(torch.randn(1, 5, 2, 32), dim=-1)
    lr = torch.zeros(1, 5, 2, 32)
    alpha = torch.ones(1, 5, 2, 32)
    o, _ = reference.chunked(q, q, torch.randn(1, 5, 2, 32), layer.spec, lr, alpha, None, None,
                             initial_state=tuple(layer.initial_state), chunk_size=1)
    assert ((o - q).norm() / q.norm()).item() < 1e-6


def test_hugging_face_paths_keep_the_initial_state():
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from miras_ext.models.hf import MirasHFConfig, MirasHFForCausalLM
    config = MirasHFConfig.from_preset("yaad", "tiny")
    for model in (MirasHFForCausalLM.from_preset("yaad", "tiny"), AutoModelForCausalLM.from_config(config)):
        for layer in miras_layers(model):
            assert torch.count_nonzero(layer.initial_state[-1]) == 0
            assert torch.count_nonzero(layer.initial_state[0]) > 0
