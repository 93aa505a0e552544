"""Weight files checked before they are loaded: safetensors headers, sizes, tensor names and shapes, and a cheap
fingerprint of a checkpoint's contents.

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}}, then the data; a file shorter than 8 + n + max(end) is truncated.  `tensor_shapes`
reads only the headers of a directory's weight files; `check_tensors` compares them with the shapes a model
declares (missing, unexpected and mis-shaped tensors are errors naming them); `fingerprint` hashes each weight
file's size, header and a few sampled data chunks, so a checkpoint replaced at the same path is told apart
without reading it whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterable

from common.models.files import FileError, read_json

__all__ = ["SINGLE_FILE", "INDEX_FILE", "safetensors_header", "weight_files", "tensor_shapes", "compare_tensors",
           "mismatch_summary", "check_tensors", "refuse_mismatch", "fingerprint"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
OTHER_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_HEADER = 100 * 2**20
SAMPLE = 64 * 2**10  # bytes hashed at each of the sampled offsets of a weight file


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header; FileError when the file is not one or is truncated."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(n) if n is not None and 0 < n <= min(MAX_HEADER, size - 8) else None
    except OSError as e:
        raise FileError(f"cannot read {path}: {e.strerror or e}") from None
    if raw is None:
        raise FileError(f"{path} is not a safetensors file ({size} bytes, no valid header); it is truncated, zeroed "
                        "or of another format")
    try:
        header = json.loads(raw)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
        shapes_ok = all(isinstance(v["shape"], list) for v in entries.values())
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        raise FileError(f"{path} has a corrupt safetensors header; expected the JSON tensor table "
                        "(a truncated or overwritten file?)") from None
    if not shapes_ok:
        raise FileError(f"{path} has a corrupt safetensors header (a tensor shape is not a list)")
    if size < 8 + n + end:
        raise FileError(f"{path} is truncated: {size} bytes, its header declares {8 + n + end}")
    return entries


def weight_files(directory: str | os.PathLike, flag: str = "--model", single: str = SINGLE_FILE,
                 index: str = INDEX_FILE) -> list[Path]:
    """The safetensors files of a model directory (all shards of `index`, model.safetensors.index.json, or the
    single `single`, model.safetensors); [] when it holds only pytorch_model.bin weights; FileError when it holds
    none, or a shard listed in the index is missing."""
    directory = Path(os.path.expanduser(directory))
    single_name, index = single, directory / index
    if index.is_file():
        data = read_json(index, "a safetensors index with a 'weight_map'")
        if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
            raise FileError(f"{flag}: {index} has no 'weight_map' object; expected a safetensors index")
        shards = sorted(set(map(str, data["weight_map"].values())))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileError(f"{flag}: shard {missing[0]} listed in {index} is missing from {directory}")
        return [directory / s for s in shards]
    if (directory / single_name).is_file():
        return [directory / single_name]
    if any((directory / f).is_file() for f in OTHER_WEIGHTS):
        return []
    raise FileError(f"{flag}: {directory} has neither {single_name} nor {index.name} (nor {OTHER_WEIGHTS[0]}): "
                    "no weights to load")


def tensor_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} over the headers of safetensors files."""
    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        out.update({k: tuple(v["shape"]) for k, v in safetensors_header(f).items()})
    return out


def _listed(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def compare_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                    optional: Iterable[str] = ()) -> str:
    """What `found` (a checkpoint's {name: shape}) lacks, has in excess or holds in another shape than the model's
    `expected` ones, as one phrase ("" when they fit); `optional` names may be absent (a tied lm_head)."""
    optional = set(optional)
    return mismatch_summary(missing=[k for k in expected if k not in found and k not in optional],
                            unexpected=sorted(k for k in found if k not in expected),
                            mis_shaped=sorted((k, tuple(found[k]), tuple(v)) for k, v in expected.items()
                                              if k in found and tuple(found[k]) != tuple(v)))


def mismatch_summary(missing: list[str], unexpected: list[str], mis_shaped: list[tuple[str, tuple, tuple]]) -> str:
    """'n missing tensor(s): a, b; n unexpected ...; n mis-shaped tensor(s): name [ckpt] (model: [model])', or ""."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s): {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s): {_listed(unexpected)}")
    if mis_shaped:
        shapes = [f"{k} {list(c)} (model: {list(m)})" for k, c, m in mis_shaped]
        parts.append(f"{len(shapes)} mis-shaped tensor(s): {_listed(shapes, 2)}")
    return "; ".join(parts)


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str,
                  optional: Iterable[str] = ()) -> None:
    """FileError naming the tensors `where` (a checkpoint) does not hold as the model expects (compare_tensors)."""
    _refuse(where, compare_tensors(expected, found, optional))


def refuse_mismatch(where: str, missing: list[str], unexpected: list[str],
                    mis_shaped: list[tuple[str, tuple, tuple]]) -> None:
    """FileError listing missing, unexpected and (name, checkpoint shape, model shape) mis-shaped tensors, if any."""
    _refuse(where, mismatch_summary(missing, unexpected, mis_shaped))


def _refuse(where: str, summary: str) -> None:
    if summary:
        raise FileError(f"{where} does not match its config.json ({summary}); check the config and the weight files")


def _file_digest(path: Path) -> str:
    """sha256 of the file's size, its first 1 MiB (the header) and SAMPLE bytes at a few offsets of the rest."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(2**20))
        for k in range(1, 9):
            f.seek(max(0, size * k // 8 - SAMPLE))
            h.update(f.read(SAMPLE))
    return h.hexdigest()


def fingerprint(directory: str | os.PathLike) -> dict[str, str]:
    """{file name: digest} of config.json and every weight file of a model directory (read in a few MiB)."""
    directory = Path(os.path.expanduser(directory))
    names = ["config.json", INDEX_FILE, *OTHER_WEIGHTS]
    files = [directory / n for n in names if (directory / n).is_file()]
    files += sorted(p for p in directory.glob("*.safetensors")) + sorted(directory.glob("pytorch_model-*.bin"))
    return {p.name: _file_digest(p) for p in files}
