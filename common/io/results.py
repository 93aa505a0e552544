"""Run records shared by the front ends: results.json (written atomically), a markdown table, provenance
(git commit, library versions), wall time per phase and peak memory (CUDA max allocated, else peak RSS)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from common.models.files import atomic_write

__all__ = ["git_commit", "environment", "PhaseTimer", "peak_memory", "reset_peak_memory", "to_jsonable",
           "write_json", "write_results", "markdown_table"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit(repo: str | os.PathLike = REPO_ROOT) -> str | None:
    """HEAD's commit hash, with '-dirty' when the working tree has uncommitted changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Python / torch / transformers versions and the visible accelerators."""
    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for lib in ("transformers", "timm", "lm_eval"):
        mod = sys.modules.get(lib)
        if mod is not None:
            env[lib] = getattr(mod, "__version__", None)
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


class PhaseTimer:
    """Wall time per named phase: `with timer.phase("quantize"): ...`; `timer.seconds` maps phase -> seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.time()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - t0, 3)

    def summary(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.time() - self._start, 3)}


def reset_peak_memory() -> None:
    """Reset the CUDA peak counters (nothing to do before CUDA is initialised: they start at zero)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def peak_memory() -> dict[str, float]:
    """Peak memory in GiB: CUDA max allocated per visible GPU (when any was used) and the process's peak RSS."""
    out: dict[str, float] = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        per_gpu = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]
        out["cuda_max_allocated_gib"] = round(max(per_gpu), 3)
        if len(per_gpu) > 1:
            out["cuda_max_allocated_gib_per_gpu"] = [round(v, 3) for v in per_gpu]
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["peak_rss_gib"] = round(rss / (2**30 if sys.platform == "darwin" else 2**20), 3)
    except ImportError:  # Windows
        pass
    return out


def to_jsonable(obj: Any) -> Any:
    """Tensors, dtypes, devices, paths, dataclasses and non-finite floats made JSON-safe (NaN/inf -> strings)."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist()) if obj.numel() <= 4096 else f"<tensor {tuple(obj.shape)}>"
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        try:
            return to_jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (temp file in the same directory, then os.replace), mode 0666 minus the umask."""
    def dump(f) -> None:
        json.dump(to_jsonable(obj), f, indent=2, allow_nan=False)
        f.write("\n")
    return atomic_write(path, dump)


def write_results(output_dir: str | os.PathLike, result: dict, filename: str = "results.json") -> Path:
    """`result` plus provenance (git commit, environment, peak memory, unless already present) to
    output_dir/filename, atomically.  Returns the path."""
    record = dict(result)
    record.setdefault("git_commit", git_commit())
    record.setdefault("environment", environment())
    record.setdefault("peak_memory", peak_memory())
    return write_json(Path(output_dir) / filename, record)


def _cell(v: Any, digits: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 2) -> str:
    """A GitHub markdown table of `rows` (dicts); columns default to the keys in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c), digits) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
