"""common.io.report on synthetic results.json files of the three front ends: table, CSV, paper comparison, plots."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from common.io import report

REPO = Path(__file__).resolve().parent.parent


def _layers(n_blocks: int, loss: float, asym: bool) -> list[dict]:
    out = []
    for b in range(n_blocks):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            rec = {"block": b, "name": name, "method": "x", "bits": 4, "shape": [8, 8], "tokens": 64,
                   "loss": loss * (b + 1), "seconds": 0.01}
            if asym:
                rec["asym_loss"] = loss * (b + 1) / 2
            out.append(rec)
    return out


def _llm(method: str, w: int, ppl: float, *, rotate: bool = True, kv: int = 16, alpha: float = 0.25,
         tasks: dict | None = None, spin: bool = False, model: str = "/models/Tiny-LM") -> dict:
    """A record shaped like fake_quant/main.py's (spinquant/main.py's with spin=True)."""
    rec = {"model": model, "run": "x", "config": {"w_bits": w, "w_groupsize": -1, "a_bits": 4, "alpha": alpha,
                                                  "percdamp": 0.01, "nsamples": 8, "rotate": rotate,
                                                  "rotate_mode": "spinquant" if spin else "hadamard"},
           "quantization": {"method": method, "w_bits": w, "a_bits": 4 if w < 16 else 16, "k_bits": kv,
                            "v_bits": kv, "rotate": rotate},
           "perplexity": {"assets/pydoc/eval.txt": ppl}, "lm_eval": tasks or {},
           "layers": _layers(3, 1.0 if method == "gptq" else 0.8, method.startswith("gptaq"))
           if method in ("gptq", "gptaq", "gptaq_exact") else [],
           "time_s": {"quantize": 36.0, "total": 50.0}, "peak_memory": {"peak_rss_gib": 1.5}}
    if spin:
        rec["rotation"] = {"kind": "spinquant", "path": "R.bin", "has_r2": True}
    return rec


def _write(root: Path, rel: str, rec: dict) -> None:
    path = root / rel / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "out"
    acc = {"piqa": {"acc": 0.6, "acc_norm": 0.625}, "arc_easy": {"acc": 0.5}, "average": {"score": 0.5625}}
    _write(root, "llm/fp16", _llm("none", 16, 10.0, rotate=False, tasks=acc))
    _write(root, "llm/rtn", _llm("rtn", 4, 40.0))
    _write(root, "llm/gptq", _llm("gptq", 4, 20.0))
    _write(root, "llm/gptaq", _llm("gptaq", 4, 15.0))
    _write(root, "llm/gptq_w2", _llm("gptq", 2, 200.0))
    _write(root, "llm/gptaq_w2", _llm("gptaq", 2, 100.0))
    _write(root, "vit/deit_gptaq", {"model": "deit_tiny_patch16_224", "method": "gptaq", "w_bits": 4, "a_bits": 4,
                                    "top1": 70.5, "top5": 90.25, "n_val": 100, "seconds": {"quantize": 3.0},
                                    "args": {"w_groupsize": -1, "percdamp": 0.1, "alpha": 0.25, "nsamples": 16},
                                    "layers": [], "peak_memory": {"cuda_max_allocated_gib": 2.0}})
    _write(root, "rot/train", {"model": "m", "run": "r", "history": [], "initial_loss": 3.0, "final_loss": 2.0})
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("{not json")
    return root


def test_rows_from_each_schema(folder):
    rows, notes = report.load_rows(folder)
    by_run = {r["run"]: r for r in rows}
    assert sorted(by_run) == ["llm/fp16", "llm/gptaq", "llm/gptaq_w2", "llm/gptq", "llm/gptq_w2", "llm/rtn",
                              "vit/deit_gptaq"]
    assert len(notes) == 2 and any("rot/train" in n for n in notes) and any("broken" in n for n in notes)
    fp = by_run["llm/fp16"]
    assert (fp["method"], fp["rotation"], fp["W"], fp["A"], fp["KV"]) == ("fp16", "none", 16, 16, 16)
    assert fp["ppl_eval"] == 10.0
    assert fp["acc_piqa"] == pytest.approx(62.5) and fp["acc_arc_easy"] == pytest.approx(50.0)
    assert fp["acc_avg"] == pytest.approx(56.25)
    g = by_run["llm/gptaq"]
    assert (g["method"], g["rotation"], g["W"], g["A"], g["group"]) == ("gptaq", "quarot", 4, 4, "llm")
    assert g["alpha"] == 0.25 and g["quant_s"] == 36.0 and g["peak_gib"] == 1.5 and len(g["_layers"]) == 6
    assert "alpha" not in by_run["llm/gptq"]  # only GPTAQ reads alpha
    v = by_run["vit/deit_gptaq"]
    assert (v["frontend"], v["top1"], v["top5"], v["peak_gib"]) == ("vit", 70.5, 90.25, 2.0)


def test_quant_order_and_generation_scores(tmp_path):
    """q_order follows --quant_order (Table 6) and the method default; a GSM8K-style task reports its strict score."""
    a_first = _llm("gptq", 4, 9.0, tasks={"gsm8k": {"exact_match,strict-match": 0.25,
                                                     "exact_match,flexible-extract": 0.3}})
    a_first["config"]["quant_order"] = "a_first"
    _write(tmp_path, "gptq_a_first", a_first)
    _write(tmp_path, "gptq", _llm("gptq", 4, 9.5))
    _write(tmp_path, "p_only", _llm("gptaq_p_term_only", 4, 12.0))
    by_run = {r["run"]: r for r in report.load_rows(tmp_path)[0]}
    assert by_run["gptq_a_first"]["q_order"] == "A->W" and by_run["gptq"]["q_order"] == "W->A"
    assert by_run["gptq_a_first"]["acc_gsm8k"] == pytest.approx(25.0)
    assert by_run["p_only"]["q_order"] == "A->W" and by_run["p_only"]["alpha"] == 0.25


def test_spinquant_record_is_tagged(tmp_path):
    _write(tmp_path, "a", _llm("gptaq", 4, 9.0, spin=True))
    rows, _ = report.load_rows(tmp_path)
    assert rows[0]["rotation"] == "spinquant" and rows[0]["group"] == "."


def test_markdown_and_csv(folder, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report.main([str(folder), "--out", str(out), "--no_plots"]) == 0
    md = (out / "report.md").read_text()
    assert "### llm" in md and "### vit" in md
    lines = md.splitlines()
    header = next(l for l in lines if l.startswith("| model | method"))
    assert header == ("| model | method | rotation | W | A | KV | ppl_eval | acc_arc_easy | acc_piqa | acc_avg "
                      "| quant_s | peak_gib |")
    assert "| Tiny-LM | gptaq | quarot | 4 | 4 | 16 | 15.00 | - | - | - | 36.00 | 1.50 |" in lines
    assert "| Tiny-LM | fp16 | none | 16 | 16 | 16 | 10.00 | 50.00 | 62.50 | 56.25 | 36.00 | 1.50 |" in lines
    assert "| deit_tiny_patch16_224 | gptaq | none | 4 | 4 | 70.50 | 90.25 | 3.00 | 2.00 |" in lines
    assert md.strip() in capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(rows) == 7
    gptaq = next(r for r in rows if r["run"] == "llm/gptaq")
    assert (gptaq["model"], gptaq["method"], gptaq["ppl_eval"], gptaq["alpha"], gptaq["group"]) == \
        ("/models/Tiny-LM", "gptaq", "15.0", "0.25", "llm")
    assert next(r for r in rows if r["run"] == "vit/deit_gptaq")["top1"] == "70.5"


def test_varying_settings_get_a_column(tmp_path):
    for a in (0.0, 0.5):
        _write(tmp_path, f"abl/gptaq_{a}", _llm("gptaq", 4, 15.0 + a, alpha=a))
    md = report.report_markdown(report.load_rows(tmp_path)[0])
    assert "| model | method | rotation | W | A | KV | alpha | ppl_eval |" in md
    assert "| Tiny-LM | gptaq | quarot | 4 | 4 | 16 | 0.50 | 15.50 |" in md


def test_paper_comparison(folder, tmp_path, capsys):
    paper = {"sources": {"p": {"url": "https://example.org/paper"}}, "entries": [
        {"table": "t1", "row": "Tiny GPTAQ", "source": "p", "model": "org/Tiny-LM", "method": "gptaq",
         "rotation": "quarot", "w_bits": 4, "a_bits": 4, "kv_bits": None, "w_groupsize": -1, "metric": "ppl_eval",
         "value": 14.5},
        {"table": "t1", "row": "Tiny GPTQ KV4", "source": "p", "model": "org/Tiny-LM", "method": "gptq",
         "rotation": "quarot", "w_bits": 4, "a_bits": 4, "kv_bits": 4, "metric": "ppl_eval", "value": 19.0},
        {"table": "t2", "row": "DeiT", "source": "p", "model": "deit_tiny_patch16_224", "method": "gptaq",
         "rotation": "none", "w_bits": 4, "a_bits": 4, "kv_bits": None, "metric": "top1", "value": 71.0}]}
    pfile = tmp_path / "paper.json"
    pfile.write_text(json.dumps(paper))
    assert report.main([str(folder), "--out", str(tmp_path / "rep"), "--paper", str(pfile), "--no_plots"]) == 0
    out = capsys.readouterr().out
    assert "| t1 | Tiny GPTAQ | ppl_eval | 14.50 | 15.00 | 0.50 | llm/gptaq |" in out
    assert "| t2 | DeiT | top1 | 71.00 | 70.50 | -0.50 | vit/deit_gptaq |" in out
    assert "Tiny GPTQ KV4" not in out  # our runs are KV16: no match
    assert "1 of 3 paper numbers have no matching run here." in out


def test_repository_paper_numbers_load():
    entries = report.load_paper(REPO / "scripts" / "paper_numbers.json")
    assert len(entries) > 100
    for e in entries:
        assert e["url"].startswith("https://")
        assert isinstance(e["value"], (int, float))
        assert e["metric"] in ("ppl_wikitext2", "ppl_c4", "top1", "quant_hours") or e["metric"].startswith("acc_")
        assert e["method"] in ("fp16", "rtn", "gptq", "gptaq", "gptaq_p_term_only")


def test_plots(folder, tmp_path):
    pytest.importorskip("matplotlib")
    rows, _ = report.load_rows(folder)
    written = report.write_plots(rows, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert any(n.startswith("bits_llm_tiny-lm_ppl_eval") for n in names)
    assert sum(n.startswith("layers_llm_tiny-lm") for n in names) == 2  # W4 and W2 settings
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    assert not list((tmp_path / "plots").glob(".*"))  # no temp files left behind


def test_plots_skipped_without_matplotlib(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert report.write_plots(report.load_rows(folder)[0], tmp_path / "plots") == []
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_bad_inputs(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert report.main([str(tmp_path)]) == 1
    assert "no results.json" in capsys.readouterr().err
    (tmp_path / "p.json").write_text("[]")
    assert report.main([str(tmp_path), "--paper", str(tmp_path / "p.json")]) == 2
    assert "no 'entries' list" in capsys.readouterr().err
