"""Task generators: shapes, label masks, determinism, argument errors."""

from types import SimpleNamespace

import pytest
import torch

from miras_ext.cli.evaluation import evaluate
from miras_ext.tasks import BOS, IGNORE, MQAR, PAD, SNIAH, TextLM, answer_accuracy


def test_mqar_shapes_and_labels():
    task = MQAR(pairs=4, seq_len=24, n_keys=16, n_values=16)
    ids, labels = task.batch(3, 5)
    assert ids.shape == labels.shape == (5, 24)
    for row_ids, row_lab in zip(ids.tolist(), labels.tolist()):
        ctx = {row_ids[2 * i]: row_ids[2 * i + 1] for i in range(4)}
        assert len(ctx) == 4 and all(k < 16 for k in ctx) and all(128 <= v < 144 for v in ctx.values())
        answers = [t for t, lab in enumerate(row_lab) if lab != IGNORE]
        assert len(answers) == 4 and min(answers) >= 8
        for t in answers:  # the label is the value of the key just before it; the input there is filler
            assert row_lab[t] == ctx[row_ids[t - 1]] and row_ids[t] == PAD
        queried = [row_ids[t - 1] for t in answers]
        assert sorted(queried) == sorted(ctx)
        rest = set(range(8, 24)) - set(answers) - {t - 1 for t in answers}
        assert all(row_ids[t] == PAD for t in rest)
    again = task.batch(3, 5)
    assert torch.equal(again[0], ids) and not torch.equal(task.batch(4, 5)[0], ids)
    assert not torch.equal(task.batch(3, 5, "val")[0], ids)


def test_mqar_errors():
    with pytest.raises(ValueError, match="seq_len"):
        MQAR(pairs=8, seq_len=20)
    with pytest.raises(ValueError, match="pairs"):
        MQAR(pairs=0, seq_len=20)


@pytest.mark.parametrize("haystack", ["noise", "text"])
def test_sniah(haystack):
    task = SNIAH(seq_len=300, haystack=haystack)
    ids, labels = task.batch(0, 6)
    assert ids.shape == labels.shape == (6, 300)
    assert (ids[:, 0] == BOS).all() and ((ids >= 0) & (ids < 256) | (ids == BOS)).all()
    for needle in ("passkey", "number", "word"):
        ids, labels = task.batch(1, 4, "val", needles=(needle,))
        for row, lab in zip(ids, labels):
            mask = lab != IGNORE
            answer = bytes(row[mask].tolist()).decode()
            assert mask[-len(answer):].all() and mask.sum() == len(answer)  # the answer ends the sequence
            text = task.decode(row)
            assert text.count(answer) >= 2                                   # in the needle and the answer
            kw = {"passkey": "pass key", "number": "special number", "word": "special word"}[needle]
            assert kw in text


def test_sniah_errors():
    with pytest.raises(ValueError, match="seq_len"):
        SNIAH(seq_len=64)
    with pytest.raises(ValueError, match="needle"):
        SNIAH(needles=("uuid",))


def test_text_lm(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 200)
    task = TextLM(seq_len=32, data=[str(tmp_path / "a.txt")])
    ids, labels = task.batch(0, 3)
    assert ids.shape == (3, 32) and torch.equal(ids, labels)
    assert "hello" in task.decode(ids[0]) or "world" in task.decode(ids[0])
    with pytest.raises(ValueError, match="does not exist"):
        TextLM(seq_len=32, data=[str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="fewer than"):
        TextLM(seq_len=4096, data=[str(tmp_path / "a.txt")])


def test_default_corpus_is_offline():
    task = TextLM(seq_len=64, max_bytes=200_000)
    assert task.describe()["source"] == "stdlib" and task.val_ids.numel() > 64


def test_answer_accuracy():
    labels = torch.tensor([[IGNORE, 5, IGNORE, 7]])
    logits = torch.zeros(1, 4, 10)
    logits[0, 0, 5] = 1  # position 0 predicts labels[1] = 5: right
    logits[0, 2, 3] = 1  # position 2 predicts labels[3] = 7: wrong
    assert answer_accuracy(logits, labels) == (1, 2, 0, 1)


class _MQAROracle(torch.nn.Module):
    """Answers each MQAR query from its inputs alone, by recall (the value stored with the key) or by
    elimination (the first context value that no input after the context has repeated: what a model that
    counts values but stores no pairs can do)."""

    def __init__(self, pairs, recall):
        super().__init__()
        self.pairs, self.recall = pairs, recall

    def forward(self, ids, labels=None):
        b, t = ids.shape
        logits = torch.zeros(b, t, 258)
        for r in range(b):
            keys, values = ids[r, 0:2 * self.pairs:2].tolist(), ids[r, 1:2 * self.pairs:2].tolist()
            left = list(values)
            for p in range(2 * self.pairs, t):
                if int(ids[r, p]) in left:
                    left.remove(int(ids[r, p]))
                if p + 1 < t and labels[r, p + 1] != IGNORE:
                    logits[r, p, values[keys.index(int(ids[r, p]))] if self.recall else left[0]] = 1
        return SimpleNamespace(logits=logits, loss=torch.tensor(0.0))


@pytest.mark.parametrize("recall", [True, False])
def test_mqar_needs_recall(recall):
    """Only recall solves MQAR: the answers are never inputs, so elimination scores what guessing among the
    context values does (about 1 / pairs; values may repeat), not the 56% it scores when they are shown."""
    task = MQAR(pairs=4, seq_len=64, n_keys=16, n_values=16)
    acc = evaluate(_MQAROracle(4, recall), task, batches=4, batch_size=64, device="cpu")["accuracy"]
    assert acc == 1.0 if recall else 0.2 < acc < 0.35
