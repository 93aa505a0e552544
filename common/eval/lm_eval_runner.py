"""Task scores of an in-memory model through lm-eval's Python API (zero- or few-shot).

acc = (1/N) sum_n [argmax_c log p(choice_c | context_n) = target_n]; acc_norm is the same with the choice
log-likelihood divided by its length in bytes. Generation tasks (GSM8K) report exact_match per answer filter
(e.g. strict-match, flexible-extract). A task's score is acc_norm where it reports it, else acc (the QuaRot
convention), else exact_match (strict-match filter first); the average is the mean of the task scores.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["run_lm_eval", "validate_tasks", "task_score", "require_chat_template"]

METRICS = ("acc", "acc_norm")
SCORE_ORDER = ("acc_norm", "acc", "exact_match", "exact_match,strict-match")  # a task's headline metric


def task_score(metrics: dict[str, float]) -> float | None:
    """The headline number of one task's metrics (see the module docstring); None for an empty dict."""
    for name in SCORE_ORDER:
        if name in metrics:
            return metrics[name]
    return next(iter(metrics.values()), None)


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


def require_chat_template(tokenizer) -> None:
    """ValueError unless `tokenizer` has a chat template (needed for chat_template=True)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _summarize(results: dict, tasks: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        row = results.get(task, {})
        metrics = {m: float(row[f"{m},none"]) for m in METRICS if f"{m},none" in row}
        for key, value in row.items():  # generation tasks: "exact_match,<filter>"
            name, _, filt = key.partition(",")
            if name == "exact_match" and isinstance(value, (int, float)):
                metrics["exact_match" if filt in ("", "none") else f"exact_match,{filt}"] = float(value)
        if not metrics:
            raise RuntimeError(f"lm-eval task '{task}' reported no acc/acc_norm/exact_match (got {sorted(row)})")
        out[task] = metrics
    scores = [task_score(m) for m in out.values()]
    out["average"] = {"score": sum(scores) / len(scores)}
    return out


def run_lm_eval(model: nn.Module, tokenizer, tasks: list[str], batch_size: int, device: torch.device | str,
                limit: int | float | None = None, include_path: str | Path | None = None,
                num_fewshot: int | None = None, chat_template: bool = False) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on `model` (moved to `device` for the run, then back) with `tokenizer`.

    Returns {task: {"acc": .., "acc_norm": .., "exact_match,<filter>": ..}} (the metrics the task reports) plus
    {"average": {"score": ..}}. `limit` caps the examples per task (int) or a fraction (float);
    `include_path` is a directory of custom task YAMLs (e.g. a task over a local jsonl file); `num_fewshot` sets
    the examples in each prompt (None: the task's default); `chat_template` formats prompts with the tokenizer's
    chat template, few-shot examples as earlier turns (lm-eval's apply_chat_template / fewshot_as_multiturn).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(f"limit must be a positive int (examples) or float fraction, got {limit!r}")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise ValueError(f"num_fewshot must be a non-negative int, got {num_fewshot!r}")
    if chat_template:
        require_chat_template(tokenizer)
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
                                          apply_chat_template=chat_template,
                                          fewshot_as_multiturn=chat_template and bool(num_fewshot),
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
