"""Text models beyond bytes: a BPE trained offline with HF `tokenizers` and kept in the checkpoint (used by
resume, eval, generate and the Hugging Face wrapper), and lm-eval-harness on a checkpoint through that
wrapper, on a task written here (a YAML task over a local JSONL file)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from miras_ext.cli import checkpoint, main
from miras_ext.cli.harness import hflm
from miras_ext.cli.checkpoint_io import load_model
from miras_ext.cli.trainer import read_metrics
from miras_ext.tasks import Tokenizer

pytest.importorskip("tokenizers")

TEXT_ARGS = ["--task", "lm", "--preset", "yaad", "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1",
             "--eval-every", "0", "--threads", "1", "--no-plot", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 30 kB of Python source (the json package of this interpreter), one file."""
    import json as pkg
    text = "\n".join(p.read_text() for p in sorted(Path(pkg.__file__).parent.glob("*.py")))[:30_000]
    path = tmp_path_factory.mktemp("corpus") / "code.py"
    path.write_text(text)
    return path


def test_bytes_as_a_transformers_tokenizer():
    tok = Tokenizer("bytes")
    fast = tok.hf()
    text = "déf f(x):\n\treturn x ≥ 0 🙂"
    assert fast.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    assert fast.decode(list(text.encode("utf-8"))) == text
    assert (fast.bos_token_id, fast.pad_token_id, len(fast)) == (256, 257, 258)


def test_bpe_is_trained_kept_in_the_checkpoint_and_resumed_exactly(corpus, tmp_path, capsys):
    args = [*TEXT_ARGS, "--data", str(corpus), "--tokenizer", "bpe:320", "--steps", "4"]
    assert main(["train", *args, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "b"), "--stop-at", "2"]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    a, b = (strip(read_metrics(tmp_path / run / "metrics.jsonl")) for run in "ab")
    assert a == b
    ckpt = tmp_path / "a" / "checkpoint"
    assert "tokenizer.json" in json.loads((ckpt / checkpoint.MANIFEST).read_text())["files"]
    model, meta = load_model(tmp_path / "a")
    tok = Tokenizer(meta["train"]["tokenizer"])
    assert model.config.vocab_size == tok.vocab_size == 320
    ids = tok.encode("def encode(self, o):")
    assert len(ids) < len("def encode(self, o):") and tok.decode(ids) == "def encode(self, o):"
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "a"), "--prompt", "def ", "--max-new-tokens", "5", "--threads", "1"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def ") and "not a text model" not in out.err
    assert main(["eval", str(tmp_path / "a"), "--batches", "1", "--threads", "1"]) == 0


DOCS = [dict(context="import json\n\ndef dump(obj):\n    return json.", choices=["dumps(obj)", "zzqx(obj)"], answer=0),
        dict(context="for i in range(10):\n    print(", choices=["i)", "@@)"], answer=0),
        dict(context="class Encoder(object):\n    def __init__(self", choices=[", x):", "}}}:"], answer=1)]

TASK_YAML = """task: miras_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""


def _loglikelihoods(model, tok) -> list[list[float]]:
    """Per document and choice, log p(choice | BOS + context) computed here from MirasForCausalLM's logits."""
    out = []
    for doc in DOCS:
        ctx = [tok.bos, *tok.encode(doc["context"])]
        scores = []
        for choice in doc["choices"]:
            ids = ctx + tok.encode(choice)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids))))
        out.append(scores)
    return out


def test_lm_eval_runs_on_a_checkpoint(corpus, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    run = tmp_path / "run"
    # Gated DeltaNet: its float32 forward is ~1e-6 from float64 (the tiny Yaad's conditioning would add to
    # the gap below).
    args = [*TEXT_ARGS, "--preset", "gated-deltanet"]
    assert main(["train", *args, "--data", str(corpus), "--steps", "3", "--out", str(run)]) == 0
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "miras_local_choice.yaml").write_text(TASK_YAML.format(data=data))
    out = tmp_path / "results.json"
    assert main(["lm-eval", str(run), "--tasks", "miras_local_choice", "--include-path", str(tasks),
                 "--threads", "1", "--json", str(out)]) == 0
    acc = json.loads(out.read_text())["miras_local_choice"]["acc,none"]
    model, meta = load_model(run)
    ours = _loglikelihoods(model.eval(), Tokenizer(meta["train"]["tokenizer"]))
    assert math.isclose(acc, sum(max(range(2), key=s.__getitem__) == d["answer"] for s, d in zip(ours, DOCS)) / 3)
    # The harness's own log-likelihoods, sample by sample.
    import lm_eval
    from lm_eval.tasks import TaskManager
    res = lm_eval.simple_evaluate(model=hflm(run), tasks=["miras_local_choice"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks)))
    assert len(res["samples"]["miras_local_choice"]) == len(DOCS)
    for sample in res["samples"]["miras_local_choice"]:
        theirs = [float(r[0][0]) for r in sample["resps"]]
        # Measured: the harness's sums differ from these by 8.5e-4 to 4e-3 (relative), changing from run to
        # run, although the model is causal, its batch rows independent and the HF wrapper's logits equal
        # these bit for bit. The cause is not found (an open point); a wrong token or a shifted position would
        # move a sum by ~10%, so 1e-2 still tells the harness scores the same texts with the same model.
        assert theirs == pytest.approx(ours[sample["doc_id"]], rel=1e-2)
