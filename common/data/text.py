"""Calibration and evaluation token windows (the GPTQ/QuaRot data pipeline).

Calibration: `nsamples` windows x_k = t[i_k : i_k + seqlen] of the tokenized train text t, offsets
i_k ~ U{0, ..., |t| - seqlen - 1} drawn with `random.Random(seed)` (C4: a random document longer than seqlen,
then a random window of it). Evaluation: the test text cut into floor(|t| / seqlen) non-overlapping windows
(C4: 256 random validation windows drawn with seed 0, as GPTQ did).

Datasets: the hub names in `DATASETS` (need the Hugging Face Hub or its cache), or a local `.txt` file,
`.jsonl` file (field "text"), `.parquet` file (column "text") or a directory `datasets.load_dataset` reads
(split "train" for calibration, "test" then "validation" for evaluation; a single-split directory serves both).
A local file is used whole for whichever role it is given: to keep evaluation held out, pass different files
to calibration and evaluation (e.g. `assets/pydoc/cal.txt` and `assets/pydoc/eval.txt`).

Chat / SFT data: a `.jsonl` whose rows hold `messages` (a list of {"role", "content"}) or a `prompt` and a
`response` (rendered as one user and one assistant turn) is rendered through the tokenizer's chat template, each
conversation tokenized on its own (the template writes its special tokens).  Calibration packs conversations:
windows x_k are filled with whole conversations in an order shuffled by `random.Random(seed)`, each window starts
at a conversation start and is cut at seqlen (the rest of its last conversation is dropped); evaluation cuts the
conversations, concatenated in file order, into non-overlapping windows.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from common.models import hub

__all__ = ["DATASETS", "FILE_TYPES", "Conversation", "check_dataset_arg", "documents_from_rows", "load_documents",
           "tokenize_text", "render_conversations", "calibration_windows", "evaluation_windows", "get_calibration_data", "get_eval_data"]

DATASETS = ("wikitext2", "c4", "ptb")
FILE_TYPES = (".txt", ".jsonl", ".parquet")
# what datasets.load_dataset reads from a plain directory
DIRECTORY_FILE_TYPES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tsv", ".txt", ".json.gz", ".jsonl.gz")
ROLE_FLAGS = {"train": "--cal_dataset", "test": "--eval_dataset"}
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
C4_EVAL_WINDOWS = 256
C4_EVAL_SEED = 0


class Conversation(list):
    """One chat / SFT example: its messages [{"role": ..., "content": ...}, ...] (a list; rendered through the
    tokenizer's chat template)."""


def _valid_choices() -> str:
    return (f"a dataset name ({', '.join(DATASETS)}), a local file ({', '.join(FILE_TYPES)}; .jsonl/.parquet "
            f"with a 'text' field, .jsonl also chat rows with 'messages' or 'prompt'/'response') or a local "
            f"dataset directory")


def _row_document(row, where: str) -> str | Conversation:
    """A text row {"text"} -> its string; a chat row {"messages"} or {"prompt", "response"} -> a Conversation."""
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row, dict) and "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}}")
        return Conversation({"role": m["role"], "content": m["content"]} for m in msgs)
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return Conversation([{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["response"]}])
    raise ValueError(f"{where}: expected a JSON object with a string field 'text', a 'messages' list, or string "
                     "fields 'prompt' and 'response'")


def documents_from_rows(rows, where: str = "data") -> list[str | Conversation]:
    """Plain texts and chat rows (dicts as in a .jsonl, see the module docstring) as documents; a source is all
    text or all chat."""
    docs = [_row_document(r if not isinstance(r, str) else {"text": r}, f"{where}: row {i}")
            for i, r in enumerate(rows, 1)]
    kinds = {isinstance(d, Conversation) for d in docs}
    if len(kinds) > 1:
        raise ValueError(f"{where}: mixes text rows and chat rows; use one kind per source")
    return docs


def check_dataset_arg(value: str, flag: str = "--dataset") -> str:
    """Cheap validation of a dataset argument (name, or existing file with an accepted extension, or directory
    holding data files)."""
    if value in DATASETS:
        return value
    path = Path(value)
    if path.is_dir():
        if not any(f.is_file() and f.name.lower().endswith(DIRECTORY_FILE_TYPES) and not f.name.startswith(".")
                   for f in path.rglob("*")):
            raise ValueError(f"{flag}: directory '{value}' holds no data files ({', '.join(DIRECTORY_FILE_TYPES)}); "
                             f"expected {_valid_choices()}")
        return value
    if path.is_file():
        if path.suffix.lower() not in FILE_TYPES:
            raise ValueError(f"{flag}: file '{value}' has extension '{path.suffix}'; accepted: {', '.join(FILE_TYPES)}")
        return value
    raise ValueError(f"{flag}: '{value}' is neither a known dataset nor an existing path; expected {_valid_choices()}")


def _hub(what: str, role: str, *args, **kwargs):
    """datasets.load_dataset(*args, **kwargs) of the hub dataset `what` (role: the split it serves, "train" or
    "test"); offline it fails at once, saying which flag takes a local file instead."""
    import datasets

    try:
        with hub.offline_unless_reachable():
            return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # offline: ConnectionError / LocalEntryNotFoundError / DatasetNotFoundError ...
        flag = ROLE_FLAGS[role]
        if not hub.reachable():
            raise RuntimeError(f"{flag} {what}: the Hugging Face Hub is not reachable and '{what}' is not in the "
                               f"local cache; pass a local .txt, .jsonl or .parquet file instead ({flag} FILE; see "
                               "scripts/get_assets.sh)") from None
        raise RuntimeError(f"could not load dataset '{what}' from the Hugging Face Hub or its cache "
                           f"({type(e).__name__}: {e}). Without internet pass a local .txt/.jsonl/.parquet file "
                           f"instead ({flag}; see scripts/get_assets.sh).") from e


def _column(ds, field: str, where: str) -> list[str]:
    if field not in ds.column_names:
        raise ValueError(f"{where}: no '{field}' column (columns: {ds.column_names})")
    return list(ds[field])


def _read_text(path: Path) -> str:
    """A UTF-8 text file; ValueError naming it when it is binary."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); expected "
                         "a plain-text file") from None
    if "\x00" in text:
        raise ValueError(f"{path}: holds NUL bytes (a binary or zeroed file); expected a plain-text file")
    return text


def _jsonl_documents(path: Path) -> list[str | Conversation]:
    """One document per non-empty line: a text row {"text"} or a chat row {"messages"} / {"prompt", "response"}."""
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object per line "
                             "('text', 'messages' or 'prompt' + 'response')") from None
        docs.append(_row_document(row, f"{path}:{lineno}"))
    if len({isinstance(d, Conversation) for d in docs}) > 1:
        raise ValueError(f"{path}: mixes text rows and chat rows; use one kind per file")
    return docs


def _local_documents(path: Path, split: str) -> list[str]:
    suffix = path.suffix.lower()
    if path.is_dir():
        import datasets

        try:
            dsd = datasets.load_dataset(str(path))
        except Exception as e:  # noqa: BLE001 - datasets rejects unreadable folders with many exception types
            raise ValueError(f"dataset directory '{path}' cannot be read by datasets.load_dataset "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        order = ["train"] if split == "train" else ["test", "validation"]
        names = [s for s in order if s in dsd] or (list(dsd) if len(dsd) == 1 else [])
        if not names:
            raise ValueError(f"dataset directory '{path}' has splits {list(dsd)}; expected "
                             f"{' or '.join(order)} (or a single split)")
        return _column(dsd[names[0]], "text", f"dataset directory '{path}' split '{names[0]}'")
    if suffix == ".txt":
        return [_read_text(path)]
    if suffix == ".jsonl":
        return _jsonl_documents(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, OSError) for non-parquet files
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if "text" not in table.column_names:
            raise ValueError(f"{path}: no 'text' column (columns: {table.column_names})")
        return [t for t in table.column("text").to_pylist() if t is not None]
    raise ValueError(f"'{path}': unsupported file type '{path.suffix}'; accepted: {', '.join(FILE_TYPES)}")


def load_documents(name_or_path: str, split: str) -> list[str | Conversation]:
    """The documents of `split` ("train" or "test"; c4 reads its validation shard for "test"): texts, or
    Conversations for a chat .jsonl."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got '{split}'")
    if name_or_path == "wikitext2":
        return _column(_hub("wikitext2", split, "wikitext", "wikitext-2-raw-v1", split=split), "text", "wikitext2")
    if name_or_path == "ptb":
        return _column(_hub("ptb", split, "ptb_text_only", "penn_treebank", split=split), "sentence", "ptb")
    if name_or_path == "c4":
        shard = C4_FILES["train" if split == "train" else "validation"]
        return _column(_hub("c4", split, "allenai/c4", data_files={split: shard}, split=split), "text", "c4")
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(f"unknown dataset '{name_or_path}': expected {_valid_choices()}")
    return _local_documents(path, split)


def _joiner(name_or_path: str) -> str:
    return " " if name_or_path == "ptb" else "\n\n"


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids [1, n] of one long text (no length warning; special tokens as the tokenizer adds them)."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids.long()


def _too_short(name_or_path: str, have: int, need: int) -> ValueError:
    return ValueError(f"dataset '{name_or_path}' has {have} tokens, but {need} are needed "
                      f"(seqlen + 1 for calibration windows, seqlen for one evaluation window); use a longer "
                      f"text or a smaller seqlen")


def _check_sizes(nsamples: int | None, seqlen: int) -> None:
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if nsamples is not None and nsamples < 1:
        raise ValueError(f"nsamples must be >= 1, got {nsamples}")


def _random_document_windows(docs: list[str], tokenizer, n: int, seqlen: int, rng: random.Random,
                             name: str) -> list[torch.Tensor]:
    """GPTQ's C4 sampling: a random document longer than seqlen tokens, then a random window of it."""
    out = []
    for _ in range(n):
        for _attempt in range(100 * len(docs)):
            ids = tokenize_text(tokenizer, docs[rng.randint(0, len(docs) - 1)])
            if ids.shape[1] > seqlen:
                break
        else:
            raise ValueError(f"dataset '{name}': found no document longer than seqlen={seqlen} tokens")
        i = rng.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[:, i:i + seqlen])
    return out


def render_conversations(tokenizer, conversations: list[Conversation], where: str = "data") -> list[torch.Tensor]:
    """Token ids [n_k] of each conversation rendered through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: chat rows need a tokenizer with a chat template, and this tokenizer has none")
    out = []
    for conv in conversations:
        text = tokenizer.apply_chat_template(list(conv), tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0].long())
    return out


def _conversation_windows(convs: list[torch.Tensor], n: int, seqlen: int, rng: random.Random,
                          name: str) -> list[torch.Tensor]:
    """Pack whole conversations, in a shuffled order, into `n` windows of seqlen tokens (module docstring)."""
    order = list(range(len(convs)))
    rng.shuffle(order)
    out, buf = [], []
    for k in order:
        buf.append(convs[k])
        if sum(t.numel() for t in buf) >= seqlen:
            out.append(torch.cat(buf)[:seqlen].unsqueeze(0))
            buf = []
            if len(out) == n:
                return out
    raise ValueError(f"chat data '{name}': {len(convs)} conversations fill only {len(out)} windows of {seqlen} "
                     f"tokens, {n} are needed; use more conversations, a smaller --nsamples or --seqlen")


def calibration_windows(docs: list[str | Conversation], tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                        name: str = "data") -> list[torch.Tensor]:
    """`nsamples` LongTensor windows [1, seqlen] of documents: random windows of the joined texts, or packed
    conversations (see the module docstring)."""
    _check_sizes(nsamples, seqlen)
    rng = random.Random(seed)
    if docs and isinstance(docs[0], Conversation):
        return _conversation_windows(render_conversations(tokenizer, docs, name), nsamples, seqlen, rng, name)
    if name == "c4":
        return _random_document_windows(docs, tokenizer, nsamples, seqlen, rng, name)
    ids = tokenize_text(tokenizer, _joiner(name).join(docs))
    if ids.shape[1] < seqlen + 1:
        raise _too_short(name, ids.shape[1], seqlen + 1)
    out = []
    for _ in range(nsamples):
        i = rng.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[:, i:i + seqlen].clone())
    return out


def get_calibration_data(name_or_path: str, tokenizer, nsamples: int, seqlen: int,
                         seed: int = 0) -> list[torch.Tensor]:
    """`nsamples` LongTensor windows [1, seqlen] of the train text (see the module docstring)."""
    _check_sizes(nsamples, seqlen)
    return calibration_windows(load_documents(name_or_path, "train"), tokenizer, nsamples, seqlen, seed,
                               name_or_path)


def evaluation_windows(docs: list[str | Conversation], tokenizer, seqlen: int, name: str = "data") -> torch.Tensor:
    """LongTensor [nwindows, seqlen]: non-overlapping windows of the joined texts (or conversations), tail dropped
    (c4: 256 random windows of its documents, seed 0)."""
    _check_sizes(None, seqlen)
    if docs and isinstance(docs[0], Conversation):
        ids = torch.cat(render_conversations(tokenizer, docs, name)).unsqueeze(0)
    elif name == "c4":
        rng = random.Random(C4_EVAL_SEED)
        return torch.cat(_random_document_windows(docs, tokenizer, C4_EVAL_WINDOWS, seqlen, rng, name))
    else:
        ids = tokenize_text(tokenizer, _joiner(name).join(docs))
    n = ids.shape[1] // seqlen
    if n == 0:
        raise _too_short(name, ids.shape[1], seqlen)
    return ids[0, :n * seqlen].reshape(n, seqlen).clone()


def get_eval_data(name_or_path: str, tokenizer, seqlen: int) -> torch.Tensor:
    """Evaluation windows LongTensor [nwindows, seqlen] of the test split (`evaluation_windows`)."""
    _check_sizes(None, seqlen)
    return evaluation_windows(load_documents(name_or_path, "test"), tokenizer, seqlen, name_or_path)
