"""Zero-shot task accuracy of an in-memory model through lm-eval's Python API.

acc = (1/N) sum_n [argmax_c log p(choice_c | context_n) = target_n]; acc_norm is the same with the choice
log-likelihood divided by its length in bytes. The average is over tasks of acc_norm where a task reports it,
acc otherwise (the QuaRot convention).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["run_lm_eval", "validate_tasks"]

METRICS = ("acc", "acc_norm")


def validate_tasks(tasks: list[str], include_path: str | Path | None = None):
    """Check task names against lm-eval's task index (offline, no dataset touched); returns the TaskManager.

    When every task is found among the custom YAMLs of `include_path`, lm-eval's built-in index (some 15k tasks,
    ~15 s to build on a small CPU) is not built at all.
    """
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ValueError(f"include_path '{include_path}' (directory of custom lm-eval task YAMLs) does not exist")
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; e.g. piqa, hellaswag, arc_easy, arc_challenge, "
                         f"winogrande, lambada_openai ({len(known)} known; `lm_eval ls tasks` lists them)")
    return manager


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _summarize(results: dict, tasks: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        row = results.get(task, {})
        metrics = {m: float(row[f"{m},none"]) for m in METRICS if f"{m},none" in row}
        if not metrics:
            raise RuntimeError(f"lm-eval task '{task}' reported no acc/acc_norm (got {sorted(row)})")
        out[task] = metrics
    scores = [m.get("acc_norm", m.get("acc")) for m in out.values()]
    out["average"] = {"acc_or_acc_norm": sum(scores) / len(scores)}
    return out


def run_lm_eval(model: nn.Module, tokenizer, tasks: list[str], batch_size: int, device: torch.device | str,
                limit: int | float | None = None, include_path: str | Path | None = None,
                num_fewshot: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on `model` (moved to `device` for the run, then back) with `tokenizer`.

    Returns {task: {"acc": .., "acc_norm": ..}} (the metrics the task reports) plus
    {"average": {"acc_or_acc_norm": ..}}. `limit` caps the examples per task (int) or a fraction (float);
    `include_path` is a directory of custom task YAMLs (e.g. a task over a local jsonl file).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(f"limit must be a positive int (examples) or float fraction, got {limit!r}")
    manager = validate_tasks(tasks, include_path)

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    device = torch.device(device)
    home = _model_device(model)
    was_training = model.training
    model.to(device).eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=0,
                                          verbosity="WARNING")
        except OSError as e:  # ConnectionError, hub/datasets "not found" errors are OSErrors
            raise RuntimeError(
                f"lm-eval could not load the data of tasks {list(tasks)} ({type(e).__name__}: {e}). lm-eval "
                "downloads task datasets from the Hugging Face Hub: without internet, fill the datasets cache on a "
                "connected machine and set HF_DATASETS_OFFLINE=1, or give a local task YAML via include_path."
            ) from e
    finally:
        model.to(home)
        model.train(was_training)
    if out is None:
        raise RuntimeError("lm-eval returned no results (non-zero rank of a distributed run?)")
    return _summarize(out["results"], list(tasks))
