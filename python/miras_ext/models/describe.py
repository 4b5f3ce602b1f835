"""Parameter counts of every preset at every size, counted on the meta device (no memory, instant).

    python -m miras_ext.models.describe            # table
    python -m miras_ext.models.describe --json     # one JSON object {preset: {size: count}}
"""

from __future__ import annotations

import json
import sys

from .params import parameter_table
from .presets import SIZES


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
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
