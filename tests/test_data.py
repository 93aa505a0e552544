"""common.data.text: local txt/jsonl/parquet loading, calibration sampling, evaluation windows, argument errors."""
import json

import pytest
import torch

from common.data.text import check_dataset_arg, get_calibration_data, get_eval_data, load_documents, tokenize_text
from fixtures import make_tiny_tokenizer, pseudo_text, write_text


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def txt(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("txt") / "cal.txt", n_words=3000, seed=1)


def test_local_formats_agree(tmp_path, txt):
    docs = [pseudo_text(200, seed=s) for s in range(3)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": docs}), parquet)
    assert load_documents(str(jsonl), "train") == docs
    assert load_documents(str(parquet), "test") == docs
    assert load_documents(str(txt), "train") == [txt.read_text()]


def test_local_dataset_directory(tmp_path):
    d = tmp_path / "ds"  # parquet shards named by split, as load_dataset reads a local directory
    (d / "data").mkdir(parents=True)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["a b", "c d"]}), d / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ["e f"]}), d / "data" / "test-00000-of-00001.parquet")
    assert load_documents(str(d), "train") == ["a b", "c d"]
    assert load_documents(str(d), "test") == ["e f"]


def test_calibration_deterministic_and_shaped(tok, txt):
    a = get_calibration_data(str(txt), tok, nsamples=5, seqlen=32, seed=3)
    b = get_calibration_data(str(txt), tok, nsamples=5, seqlen=32, seed=3)
    c = get_calibration_data(str(txt), tok, nsamples=5, seqlen=32, seed=4)
    assert len(a) == 5 and all(x.shape == (1, 32) and x.dtype == torch.long for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    ids = tokenize_text(tok, txt.read_text())[0]
    for x in a:  # every window is a contiguous slice of the tokenized text
        assert any(torch.equal(ids[i:i + 32], x[0]) for i in range(ids.numel() - 31))


def test_too_short_file(tmp_path, tok):
    short = write_text(tmp_path / "short.txt", n_words=20)
    with pytest.raises(ValueError, match=r"short\.txt.*tokens.*needed"):
        get_calibration_data(str(short), tok, nsamples=2, seqlen=512, seed=0)
    with pytest.raises(ValueError, match=r"short\.txt"):
        get_eval_data(str(short), tok, seqlen=512)


def test_eval_windows_non_overlapping_and_complete(tok, txt):
    ids = tokenize_text(tok, txt.read_text())[0]
    win = get_eval_data(str(txt), tok, seqlen=40)
    n = ids.numel() // 40
    assert win.shape == (n, 40) and win.dtype == torch.long
    assert torch.equal(win.reshape(-1), ids[:n * 40])


def test_unknown_name_and_bad_args(tmp_path, tok):
    with pytest.raises(ValueError, match="wikitext2.*c4.*ptb.*\\.txt"):
        get_eval_data("wikitext3", tok, seqlen=16)
    with pytest.raises(ValueError, match="--cal_dataset.*neither"):
        check_dataset_arg("nope", "--cal_dataset")
    bad = tmp_path / "x.csv"
    bad.write_text("a")
    with pytest.raises(ValueError, match="--eval_dataset.*\\.csv"):
        check_dataset_arg(str(bad), "--eval_dataset")
    assert check_dataset_arg("c4", "--cal_dataset") == "c4"
    assert check_dataset_arg(str(tmp_path), "--cal_dataset") == str(tmp_path)


def test_hub_failure_becomes_clear_error(monkeypatch, tok):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="wikitext2.*local .txt"):
        get_eval_data("wikitext2", tok, seqlen=16)
