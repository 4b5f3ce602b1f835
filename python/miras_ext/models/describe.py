"""Parameter counts of every preset at every size (counted on the meta device: no memory, instant), and the
values every gate of a freshly built model starts with.

    python -m miras_ext.models.describe            # parameter table
    python -m miras_ext.models.describe --json     # one JSON object {preset: {size: count}}
    python -m miras_ext.models.describe --gates    # gates at init (x = 0: the gate biases), per preset
"""

from __future__ import annotations

import json
import sys

import torch

from .miras_layer import MirasLayer
from .model import MirasForCausalLM
from .params import parameter_table
from .presets import PRESETS, SIZES, preset

GATES = ("lr", "alpha", "momentum", "delta")


def initial_gates(name: str, size: str = "tiny") -> dict[str, list[float] | None]:
    """Each gate of the first Miras layer of a freshly built preset at x = 0, one value per head (the
    channels of a per-channel gate start equal); None where the preset has no such gate."""
    config = preset(name, size)
    # One block and a small vocabulary: the gates do not depend on either.
    config = config.replace(n_layers=1, mixers=config.mixers[:1], vocab_size=256)
    model = MirasForCausalLM(config)
    layer = next((m for m in model.modules() if isinstance(m, MirasLayer)), None)
    if layer is None:
        return dict.fromkeys(GATES)
    with torch.no_grad():
        values = layer.gates(torch.zeros(1, 1, config.dim))
    return {g: None if v is None else v.reshape(config.n_heads, -1)[:, 0].tolist() for g, v in zip(GATES, values)}


def _cell(values: list[float] | None) -> str:
    if values is None:
        return "-"
    if max(values) - min(values) <= 1e-9 * max(1.0, abs(max(values))):
        return f"{values[0]:.4g}"
    return f"{values[0]:.4g} ... {values[-1]:.4g} ({len(values)} heads)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--gates" in argv:
        size = "170M" if "--170M" in argv else "tiny"
        print(f"| preset ({size}) | " + " | ".join(GATES) + " |")
        print("|---" * (len(GATES) + 1) + "|")
        for name in PRESETS:
            gates = initial_gates(name, size)
            print(f"| {name} | " + " | ".join(_cell(gates[g]) for g in GATES) + " |")
        return
    table = parameter_table()
    if "--json" in argv:
        print(json.dumps(table))
        return
    sizes = list(SIZES)
    print(f"{'preset':<18}" + "".join(f"{s:>14}" for s in sizes))
    for name, row in table.items():
        cells = "".join(f"{row[s]:>14,}" for s in sizes)
        print(f"{name:<18}{cells}")


if __name__ == "__main__":
    main()
