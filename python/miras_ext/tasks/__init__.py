"""Training tasks for the `miras` command: MQAR, S-NIAH and causal language modelling on text.

Every task gives batch(step, size, split) -> (input_ids [B, T], labels [B, T]) as a pure function of
(seed, split, step); labels are aligned with input_ids (the model shifts them) and -100 where nothing is
scored.
"""

from .base import BOS, BYTE_VOCAB, IGNORE, PAD, Task, answer_accuracy
from .mqar import MQAR
from .sniah import HAYSTACKS, NEEDLES, SNIAH
from .text import DataError, TextLM, Tokenizer

TASKS = ("mqar", "sniah", "lm")

__all__ = ["BOS", "BYTE_VOCAB", "DataError", "HAYSTACKS", "IGNORE", "MQAR", "NEEDLES", "PAD", "SNIAH", "TASKS",
           "Task", "TextLM", "Tokenizer", "answer_accuracy"]
