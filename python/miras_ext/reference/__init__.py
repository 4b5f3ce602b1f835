"""Slow, obviously-correct definitions of every Miras model (docs/math.md).

recurrent: the exact token-by-token recurrence, inner gradients by torch autograd.
chunked:   the chunkwise algorithm in plain tensor ops; the baseline every fast path must match and beat.
minimal:   the chunkwise algorithm in one screen, torch only (reference/minimal.py; not imported here).
"""

from . import bias
from .chunked import chunked
from .recurrent import recurrent

__all__ = ["bias", "chunked", "recurrent"]
