"""lm-eval-harness on a `miras train` checkpoint (the `lm-eval` extra: pip install "lm-eval[hf]"): the model
through the Hugging Face wrapper (models/hf.py), the run's tokenizer (bytes, or the BPE kept in the
checkpoint) as a transformers tokenizer, and lm_eval's HFLM around both. Tasks are lm_eval's, or YAML
files in `include_path` (e.g. a task over a local JSONL file: no network needed)."""

from __future__ import annotations

from pathlib import Path


def hflm(path: str | Path, device: str = "cpu", batch_size: int = 1):
    """lm_eval's HFLM for the text model of a checkpoint (a run folder or its checkpoint/)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError(f"lm-eval: the `lm-eval[hf]` extra is not installed ({e}); "
                          "pip install \"lm-eval[hf]\"") from None
    from ..models.hf import MirasHFForCausalLM
    from ..tasks import Tokenizer
    from .arguments import UsageError
    from .checkpoint_io import load_model
    model, meta = load_model(path, device)
    if meta["task"]["task"] != "lm":
        raise UsageError(f"checkpoint: {path} is a model of the {meta['task']['task']} task, not a text model")
    tok = Tokenizer(meta["train"].get("tokenizer", "bytes")).hf()
    wrapped = MirasHFForCausalLM.from_miras(model, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id).eval()
    # Documents were trained as BOS text: contexts start with BOS too.
    return HFLM(pretrained=wrapped, tokenizer=tok, backend="causal", batch_size=batch_size, device=device,
                max_length=model.config.max_seq_len, add_bos_token=True)


def evaluate(path: str | Path, tasks: list[str], include_path: str | None = None, limit: int | None = None,
             device: str = "cpu", batch_size: int = 1) -> dict:
    """lm_eval.simple_evaluate on the checkpoint; returns its results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    return lm_eval.simple_evaluate(model=hflm(path, device, batch_size), tasks=tasks, limit=limit,
                                   task_manager=TaskManager(include_path=include_path))
