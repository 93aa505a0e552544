"""Resumable block-by-block quantization (`--resume`): a checkpoint after every block.

After block l is quantized the driver commits, in one directory,
    layer_<l>.pt              the quantized weights of its linears (plus their QuantResults when an export needs them),
    streams_<l+1>_rank<r>.pt  rank r's inputs of block l+1: X~_{l+1} and, for GPTAQ, the full-precision X_{l+1},
    state.json                {fingerprint, next_block = l + 1, per-linear records}, written last (the commit point).
Every file goes to a temporary name first and is renamed into place (os.replace), so a kill at any moment leaves the
last commit intact.  A later run with the same configuration fingerprint loads the weights of blocks 0..l, restores
the streams and continues; since block l+1 then sees exactly the tensors it would have seen, the result equals an
uninterrupted run's.  A different fingerprint is an error naming what differs; the run's fingerprint covers the
model's files (common.models.checkpoint.fingerprint) and the calibration tokens.  `check` also reads the shape of
state.json and the table of contents of every file it will need (a truncated file is an error before any long
work), and `finish` marks the state complete once the run's results are written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from common.models.files import atomic_write
from common.pipeline import distributed
from common.io.results import to_jsonable, write_json
from common.solver import QuantResult

__all__ = ["ResumeError", "ResumeState", "STATE_FILE", "saved_blocks"]

STATE_FILE = "state.json"
FORMAT = 1


class ResumeError(ValueError):
    """The resume directory holds the state of another configuration, or cannot be read."""


def _normalise(obj: Any) -> Any:
    """The JSON form of obj (tuples become lists, tensors lists...), as state.json stores it."""
    return json.loads(json.dumps(to_jsonable(obj)))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def differences(saved: dict, current: dict) -> list[str]:
    """'key: saved A, now B' for every (dotted) key whose value differs between two fingerprints."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: saved {a.get(k, '<unset>')!r}, now {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True, fsync=True)


def _result_to_dict(res: QuantResult) -> dict:
    d = {f.name: getattr(res, f.name) for f in dataclasses.fields(res)}
    d = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
    if d["codes"] is not None and res.bits <= 8:
        d["codes"] = d["codes"].to(torch.uint8)  # codes lie in [0, 2^bits - 1]: a quarter of the size
    return d


def _result_from_dict(d: dict) -> QuantResult:
    if d["codes"] is not None:
        d = {**d, "codes": d["codes"].to(torch.int32)}
    return QuantResult(**d)


class ResumeState:
    """Checkpoints of one run in `directory`, valid for the configuration `fingerprint` (a JSON-able dict; the
    world size is added to it, since the streams are saved per rank)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict):
        self.directory = Path(directory)
        self.fingerprint = _normalise({**fingerprint, "world_size": distributed.world_size()})

    # ------------------------------------------------------------------------------------------ reading

    def _state(self) -> dict | None:
        path = self.directory / STATE_FILE
        if not path.is_file():
            return None
        state = _read_state(path)
        diff = differences(state["fingerprint"], self.fingerprint)
        if diff:
            raise ResumeError(f"--resume: {self.directory} holds a run with a different configuration "
                              f"({'; '.join(diff)}); use another --output_dir or delete that directory")
        return state

    def check(self) -> int:
        """The number of blocks already finished (0 when nothing is saved yet); raises ResumeError when the saved
        state belongs to a different configuration or a file it needs is missing or truncated.  Cheap (reads
        state.json and each file's table of contents): call it before any long work."""
        state = self._state()
        if state is None:
            return 0
        needed = [self.directory / f"layer_{b:04d}.pt" for b in range(state["next_block"])]
        if state.get("streams", False):
            needed.append(self._streams_path(state["next_block"], distributed.rank()))
        for path in needed:
            try:
                zipfile.ZipFile(path).close()
            except (OSError, zipfile.BadZipFile) as e:
                raise ResumeError(f"--resume: {path} is missing or truncated ({type(e).__name__}); delete "
                                  f"{self.directory} to start over") from None
        return int(state["next_block"])

    def load(self) -> tuple[int, list[dict]]:
        """(next_block, records of the finished blocks)."""
        state = self._state()
        return (0, []) if state is None else (int(state["next_block"]), list(state["records"]))

    def load_block(self, block: int) -> tuple[dict[str, torch.Tensor], dict[str, QuantResult] | None]:
        """The saved quantized weights of block `block` by linear name, and their QuantResults if they were saved."""
        data = self._load(self.directory / f"layer_{block:04d}.pt")
        results = data["results"]
        return data["weights"], None if results is None else {k: _result_from_dict(v) for k, v in results.items()}

    def load_streams(self, block: int, inputs: list[torch.Tensor],
                     asymmetric: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's saved inputs of block `block` (X~ and, for GPTAQ, X), on the CPU; `inputs` (the calibration
        inputs of block 0 of this run) must have the same batch shapes."""
        data = self._load(self._streams_path(block, distributed.rank()))
        xq, xfp = data["xq"], data["xfp"]
        if [x.shape for x in xq] != [x.shape for x in inputs] or (asymmetric and len(xfp) != len(xq)):
            raise ResumeError(f"--resume: the saved streams of block {block} do not match this run's calibration "
                              f"batches ({[list(x.shape) for x in xq]} saved, {[list(x.shape) for x in inputs]} now)")
        return xq, xfp

    def _load(self, path: Path) -> Any:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or overwritten file fails in many ways
            raise ResumeError(f"--resume: cannot read {path}: {str(e).splitlines()[0] if str(e) else e}") from None

    def _streams_path(self, block: int, rank: int) -> Path:
        return self.directory / f"streams_{block:04d}_rank{rank}.pt"

    # ------------------------------------------------------------------------------------------ writing

    def save_block(self, block: int, weights: dict[str, torch.Tensor],
                   results: dict[str, QuantResult] | None = None) -> None:
        """Rank 0 writes block `block`'s quantized weights (and QuantResults, when given)."""
        if distributed.is_main():
            self.directory.mkdir(parents=True, exist_ok=True)
            data = {"weights": {k: v.detach().cpu() for k, v in weights.items()},
                    "results": None if results is None else {k: _result_to_dict(v) for k, v in results.items()}}
            _save_atomic(data, self.directory / f"layer_{block:04d}.pt")

    def commit(self, next_block: int, xq: list[torch.Tensor], xfp: list[torch.Tensor], records: list[dict]) -> None:
        """Every rank saves its streams (the inputs of block `next_block`; none after the last block), then rank 0
        writes state.json (the commit) and removes the streams of earlier commits."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if xq:
            _save_atomic({"xq": [x.cpu() for x in xq], "xfp": [x.cpu() for x in xfp]},
                         self._streams_path(next_block, distributed.rank()))
        distributed.barrier()  # every rank's streams are on disk before the commit
        if not distributed.is_main():
            return
        write_json(self.directory / STATE_FILE, {"format": FORMAT, "fingerprint": self.fingerprint,
                                                 "next_block": next_block, "records": records,
                                                 "streams": bool(xq)})
        for path in self.directory.glob("streams_*_rank*.pt"):
            if int(path.name.split("_")[1]) < next_block:  # later ones may already be another rank's next commit
                path.unlink(missing_ok=True)

    def finish(self) -> None:
        """Mark the state complete (rank 0, after the run's results are written): a later --resume of the same
        configuration loads every block and solves nothing."""
        path = self.directory / STATE_FILE
        if distributed.is_main() and path.is_file():
            write_json(path, {**_read_state(path), "complete": True})


def _read_state(path: Path) -> dict:
    """state.json, checked for the fields resuming reads."""
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"--resume: cannot read {path}: {e}") from None
    if not isinstance(state, dict):
        raise ResumeError(f"--resume: {path} holds a {type(state).__name__}; expected a JSON object")
    if state.get("format") != FORMAT:
        raise ResumeError(f"--resume: {path} has format {state.get('format')!r}, expected {FORMAT}")
    shape = {"fingerprint": dict, "next_block": int, "records": list}
    wrong = [k for k, t in shape.items() if not isinstance(state.get(k), t) or isinstance(state.get(k), bool)]
    if wrong or state["next_block"] < 0:
        raise ResumeError(f"--resume: {path} is damaged (field {(wrong or ['next_block'])[0]!r}); expected "
                          "{format, fingerprint: {...}, next_block: n >= 0, records: [...]}; delete "
                          f"{path.parent} to start over")
    return state


def saved_blocks(directory: str | os.PathLike) -> int:
    """How many blocks the resume state in `directory` holds (0 when there is none or it cannot be read)."""
    try:
        return _read_state(Path(directory) / STATE_FILE)["next_block"]
    except ResumeError:
        return 0
