"""Aggregate results.json files (fake_quant, spinquant, vit_quant) into a markdown table, a CSV and PNG plots.

One row per run: its identity (model, method, rotation, W/A/KV bits, group size), the settings that vary inside
its table, and its metrics: ppl_<dataset> = exp(mean token NLL), acc_<task> = lm-eval task score (acc_norm, else acc,
else exact_match) in %, acc_avg their mean, top1/top5 in %, quant_s = wall seconds of the quantization phase and
peak_gib = peak GPU memory (CUDA max allocated; process peak RSS on CPU).  With --paper, each number of
scripts/paper_numbers.json is printed beside the matching runs, with ours - paper.  Plots (matplotlib, optional):
the first metric against weight bits per method, and the per-layer proxy loss sum_linears (2/N)||(Q - W) X~||^2
of GPTQ vs GPTAQ across depth.

    python -m common.io.report outputs/ [--out outputs/report] [--paper scripts/paper_numbers.json]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from common.eval.lm_eval_runner import task_score
from common.models.files import atomic_write
from common.io.results import markdown_table

__all__ = ["ReportError", "load_rows", "row_from_record", "report_markdown", "rows_csv", "compare_with_paper",
           "load_paper", "write_plots", "main"]

IDENTITY = ("model", "method", "rotation", "W", "A", "KV", "wg")
# settings that distinguish ablation runs; shown in a table only where they vary inside it
SETTINGS = ("w_asym", "w_clip", "a_asym", "a_clip_ratio", "percdamp", "act_order", "static_groups", "alpha",
            "order", "nsamples", "seqlen", "cal_dataset", "seed")
COST = ("quant_s", "peak_gib")
METHOD_NAMES = {"none": "fp16", "fp16": "fp16"}
GPTAQ_METHODS = ("gptaq", "gptaq_exact", "gptaq_p_term_only")
PLOT_METRICS = ("ppl_wikitext2", "top1", "acc_avg")


class ReportError(Exception):
    """A problem with the report's inputs, reported as one line."""


def _dataset_key(name: str) -> str:
    """'wikitext2' stays; a file path becomes its stem ('assets/pydoc/eval.txt' -> 'eval')."""
    if os.sep in name or "." in os.path.basename(name):
        name = Path(name).stem
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "data"


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x)
    try:  # non-finite floats are stored as strings ("inf", "nan")
        return float(x)
    except (TypeError, ValueError):
        return None


def _peak_gib(peak: dict | None) -> float | None:
    if not isinstance(peak, dict):
        return None
    return _num(peak.get("cuda_max_allocated_gib", peak.get("peak_rss_gib")))


def _kv(k: Any, v: Any) -> Any:
    return k if k == v else f"{k}/{v}"


def row_from_record(rec: dict, run: str = "", group: str = ".") -> dict | None:
    """One flat row of a results.json record, or None for records that are not quantization runs (e.g. the
    rotation-training record of spinquant/optimize_rotation.py)."""
    row: dict[str, Any] = {"group": group, "run": run}
    if "quantization" in rec and "perplexity" in rec:  # fake_quant/main.py and spinquant/main.py
        q, cfg = rec["quantization"], rec.get("config", {})
        spin = (rec.get("rotation") or {}).get("kind") == "spinquant" or cfg.get("rotate_mode") == "spinquant"
        row.update(frontend="llm", model=rec.get("model"),
                   method=METHOD_NAMES.get(q.get("method"), q.get("method")),
                   rotation="spinquant" if spin else ("quarot" if q.get("rotate") else "none"),
                   W=q.get("w_bits"), A=q.get("a_bits"), KV=_kv(q.get("k_bits"), q.get("v_bits")),
                   wg=cfg.get("w_groupsize", -1))
        for name, value in (rec.get("perplexity") or {}).items():
            row[f"ppl_{_dataset_key(name)}"] = _num(value)
        for task, scores in (rec.get("lm_eval") or {}).items():
            if not isinstance(scores, dict) or not scores:
                continue
            value = _num(task_score(scores))
            row["acc_avg" if task == "average" else f"acc_{task}"] = None if value is None else 100.0 * value
        seconds = rec.get("time_s") or {}
    elif "top1" in rec and "method" in rec:  # vit_quant/main.py
        cfg = rec.get("args", {})
        row.update(frontend="vit", model=rec.get("model"), method=METHOD_NAMES.get(rec["method"], rec["method"]),
                   rotation="none", W=rec.get("w_bits"), A=rec.get("a_bits"), KV=None,
                   wg=cfg.get("w_groupsize", -1), top1=_num(rec.get("top1")), top5=_num(rec.get("top5")))
        seconds = rec.get("seconds") or {}
    else:
        return None
    if row["method"] in ("gptq", "rtn", *GPTAQ_METHODS) and not (isinstance(row.get("W"), int) and row["W"] < 16):
        row["method"] = "fp16"
    for key in SETTINGS:
        if key in cfg:
            row[key] = cfg[key]
    # drop the settings a run does not use, so that they do not show up as "varying" in its table
    unused = set()
    if row["method"] not in GPTAQ_METHODS:
        unused.add("alpha")
    if row["method"] in ("fp16", "rtn"):
        unused |= {"percdamp", "act_order", "static_groups", "order", "nsamples", "cal_dataset"}
    if row["method"] == "fp16":
        unused |= {"w_asym", "w_clip"}
    if row.get("A") in (None, 16):
        unused |= {"a_asym", "a_clip_ratio"}
    for key in unused:
        row.pop(key, None)
    row["quant_s"] = _num(seconds.get("quantize"))
    row["quant_hours"] = None if row["quant_s"] is None else row["quant_s"] / 3600.0  # for paper matching only
    # activation quantizers during calibration: --quant_order, by default off for GPTQ (W->A) and on for GPTAQ (A->W)
    row["q_order"] = {"w_first": "W->A", "a_first": "A->W"}.get(
        cfg.get("quant_order"), "A->W" if row["method"] in GPTAQ_METHODS else "W->A")
    row["peak_gib"] = _peak_gib(rec.get("peak_memory"))
    row["_layers"] = [r for r in rec.get("layers") or [] if isinstance(r, dict)]
    return row


def load_rows(folder: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """Rows of every results.json below `folder` (sorted by path) and one-line notes on the files skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise ReportError(f"results folder {folder} does not exist (expected a folder holding results.json files)")
    rows, notes = [], []
    for path in sorted(root.rglob("results.json")):
        rel = path.parent.relative_to(root)
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            notes.append(f"skipped {path}: not readable JSON ({type(e).__name__})")
            continue
        if isinstance(rec, dict) and rec.get("status") == "failed":
            notes.append(f"skipped {path}: the run failed ({rec.get('error', 'no message')})")
            continue
        group = str(rel.parent)  # "." for a run directly below the folder
        row = row_from_record(rec, run=str(rel), group=group) if isinstance(rec, dict) else None
        if row is None:
            notes.append(f"skipped {path}: not a quantization run (no perplexity or top1)")
            continue
        rows.append(row)
    return rows, notes


def _metric_columns(rows: Sequence[dict]) -> list[str]:
    """ppl_* first, then acc_* (acc_avg last among them), top1/top5, cost."""
    keys = {k for r in rows for k, v in r.items() if v is not None}
    ppl = sorted(k for k in keys if k.startswith("ppl_"))
    acc = sorted(k for k in keys if k.startswith("acc_") and k != "acc_avg") + (["acc_avg"] if "acc_avg" in keys
                                                                                  else [])
    return ppl + acc + [k for k in ("top1", "top5") if k in keys] + [k for k in COST if k in keys]


def _varying(rows: Sequence[dict], keys: Iterable[str]) -> list[str]:
    out = []
    for k in keys:
        values = {json.dumps(r.get(k)) for r in rows if k in r}
        if len(values) > 1:
            out.append(k)
    return out


def _display(rows: Sequence[dict]) -> list[dict]:
    return [{**r, "model": os.path.basename(os.path.normpath(str(r.get("model"))))} for r in rows]


METHOD_ORDER = {"fp16": 0, "rtn": 1, "gptq": 2, "gptaq": 3, "gptaq_exact": 4}


def _sort_key(r: dict) -> tuple:
    """Model, then from the mildest setting (most bits) down, then the method (fp16, rtn, gptq, gptaq, exact)."""
    def bits(v: Any) -> float:
        return -float(v) if isinstance(v, (int, float)) else -99.0
    return (_model_key(r.get("model")), bits(r.get("W")), bits(r.get("A")), bits(r.get("KV")),
            bits(r.get("wg") if r.get("wg") not in (None, -1) else 1e9), str(r.get("rotation")),
            METHOD_ORDER.get(r["method"], 9), json.dumps([r.get(k) for k in SETTINGS], default=str), r["run"])


def report_markdown(rows: Sequence[dict], digits: int = 2) -> str:
    """One markdown table per group (the folder holding the run folders, relative to the results folder)."""
    by_group: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=_sort_key):
        by_group[r["group"]].append(r)
    parts = []
    for group in sorted(by_group):
        grows = by_group[group]
        ident = [c for c in IDENTITY if any(r.get(c) is not None for r in grows)]
        if "wg" in ident and all(r.get("wg") in (-1, None) for r in grows):
            ident.remove("wg")
        cols = ident + _varying(grows, SETTINGS) + _metric_columns(grows)
        title = "results" if group == "." else group
        parts.append(f"### {title}\n\n" + markdown_table(_display(grows), cols, digits=digits))
    return "\n\n".join(parts)


def rows_csv(rows: Sequence[dict]) -> str:
    """All rows, all columns (identity, settings, metrics, group, run)."""
    cols = list(IDENTITY) + [k for k in SETTINGS if any(k in r for r in rows)] + _metric_columns(rows)
    cols = [c for c in cols if c not in COST] + [c for c in COST if any(r.get(c) is not None for r in rows)]
    cols += ["frontend", "group", "run"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return buf.getvalue()


# ---------------------------------------------------------------- paper numbers

MATCH_KEYS = ("method", "rotation", "w_bits", "a_bits", "kv_bits", "w_groupsize", "q_order")
ROW_KEYS = {"w_bits": "W", "a_bits": "A", "kv_bits": "KV", "w_groupsize": "wg"}


def _model_key(name: Any) -> str:
    return os.path.basename(os.path.normpath(str(name))).lower()


def load_paper(path: str | os.PathLike) -> list[dict]:
    """The `entries` of scripts/paper_numbers.json, each with its source URL resolved."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ReportError(f"--paper: cannot read {path} ({e.strerror or type(e).__name__})") from None
    except ValueError as e:
        raise ReportError(f"--paper: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ReportError(f"--paper: {path} has no 'entries' list")
    sources = data.get("sources", {})
    out = []
    for i, e in enumerate(data["entries"]):
        missing = [k for k in ("table", "row", "model", "method", "metric", "value") if k not in e]
        if missing:
            raise ReportError(f"--paper: entry {i} of {path} lacks {', '.join(missing)}")
        out.append({**e, "url": (sources.get(e.get("source"), {}) or {}).get("url", e.get("source"))})
    return out


def _matches(entry: dict, row: dict) -> bool:
    if _model_key(entry["model"]) != _model_key(row.get("model")) or entry["metric"] not in row:
        return False
    for key in MATCH_KEYS:
        want = entry.get(key)
        if want is None:  # not stated by the source: any value matches
            continue
        have = row.get(ROW_KEYS.get(key, key))
        if key == "w_groupsize" and have is None:
            have = -1
        if have != want:
            return False
    return row.get(entry["metric"]) is not None


def compare_with_paper(rows: Sequence[dict], entries: Sequence[dict], digits: int = 2) -> tuple[str, int]:
    """Markdown table of paper numbers beside every matching run (ours - paper); also the number of paper
    entries that no run matched."""
    out, unmatched = [], 0
    for e in entries:
        hits = [r for r in rows if _matches(e, r)]
        if not hits:
            unmatched += 1
            continue
        for r in hits:
            ours = r[e["metric"]]
            out.append({"table": e["table"], "row": e["row"], "metric": e["metric"], "paper": float(e["value"]),
                        "ours": ours, "ours - paper": ours - float(e["value"]), "run": r["run"]})
    if not out:
        return "", unmatched
    cols = ["table", "row", "metric", "paper", "ours", "ours - paper", "run"]
    return markdown_table(out, cols, digits=digits), unmatched


# ---------------------------------------------------------------- plots

def _slug(*parts: Any) -> str:
    """A file-name stem of `parts` ('.' parts, the top-level group, left out)."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", "_".join(str(p) for p in parts if str(p) != ".")).strip("-")


def _setting_label(row: dict, extra: Sequence[str], with_w: bool = True) -> str:
    """What a run's quantization is, without the method: e.g. 'quarot W4 A4 KV4', 'none W3 g64 act_order=True'."""
    label = str(row.get("rotation"))
    if with_w:
        label += f" W{row.get('W')}"
    if row.get("A") not in (None, 16):
        label += f" A{row['A']}"
    if row.get("KV") not in (None, 16):
        label += f" KV{row['KV']}"
    if row.get("wg") not in (None, -1):
        label += f" g{row['wg']}"
    return label + "".join(f" {k}={row[k]}" for k in extra if k in row)


def _color(method: str) -> str:
    """One matplotlib cycle colour per method, the same in every panel."""
    return f"C{METHOD_ORDER.get(method, 9)}"


def _per_block(layers: Sequence[dict], key: str) -> dict[int, float]:
    """Sum over each block's linears of layers[i][key] (blocks where some linear lacks it are left out)."""
    sums: dict[int, float] = defaultdict(float)
    missing = set()
    for rec in layers:
        if key in rec:
            sums[int(rec["block"])] += float(rec[key])
        else:
            missing.add(int(rec["block"]))
    return {b: v for b, v in sorted(sums.items()) if b not in missing}


def _plot_layers(plt, rows: Sequence[dict], model: str, setting: str, save, group: str) -> None:
    """Top: loss = (2/N)||(Q - W) X~||^2 per block (log); bottom, when any run has it: GPTAQ's asym_loss =
    (2/N)(||Q X~ - W X||^2 - ||W (X - X~)||^2), which may be negative."""
    asym = [r for r in rows if any("asym_loss" in rec for rec in r["_layers"])]
    fig, axes = plt.subplots(2 if asym else 1, 1, figsize=(6.5, 6.5 if asym else 4), sharex=True, squeeze=False)
    top = axes[0][0]
    for r in rows:
        pts = _per_block(r["_layers"], "loss")
        top.plot(list(pts), list(pts.values()), marker=".", label=r["method"], color=_color(r["method"]))
    top.set_yscale("log")
    top.set_ylabel("sum of loss over the block's linears")
    top.set_title(f"{model}: {setting}", fontsize=9)
    top.legend(fontsize=7)
    if asym:
        bottom = axes[1][0]
        values = []
        for r in asym:
            pts = _per_block(r["_layers"], "asym_loss")
            values += [abs(v) for v in pts.values() if v]
            bottom.plot(list(pts), list(pts.values()), marker=".", label=r["method"], color=_color(r["method"]))
        bottom.set_yscale("symlog", linthresh=min(values) if values else 1.0)
        bottom.set_ylabel("sum of asym_loss")
        bottom.legend(fontsize=7)
    axes[-1][0].set_xlabel("block")
    save(fig, f"layers_{_slug(group, model, setting)}.png")


def write_plots(rows: Sequence[dict], out_dir: str | os.PathLike) -> list[Path]:
    """PNG plots into out_dir; [] with a message on stderr when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install matplotlib, or the 'plot' extra)",
              file=sys.stderr)
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".png", dir=out_dir)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
            os.replace(tmp, path)
        finally:
            plt.close(fig)
            if os.path.exists(tmp):
                os.unlink(tmp)
        written.append(path)

    by_model: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_model[(r["group"], _model_key(r["model"]))].append(r)
    for (group, model), mrows in sorted(by_model.items()):
        extra = _varying(mrows, SETTINGS)
        quant = [r for r in mrows if r["method"] != "fp16" and isinstance(r.get("W"), int)]
        metric = next((m for m in PLOT_METRICS if any(r.get(m) is not None for r in quant)),
                      next((m for m in _metric_columns(quant) if m.startswith("ppl_")), None))
        if metric and len({r["W"] for r in quant if r.get(metric) is not None}) > 1:
            fig, ax = plt.subplots(figsize=(8, 4.5))
            series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
            for r in quant:
                if r.get(metric) is not None and math.isfinite(r[metric]):
                    series[(r["method"], _setting_label(r, extra, with_w=False))].append((r["W"], r[metric]))
            kinds = sorted({k for _, k in series})
            for (method, kind), pts in sorted(series.items(), key=lambda kv: (kinds.index(kv[0][1]),
                                                                           METHOD_ORDER.get(kv[0][0], 9))):
                pts.sort()
                i = kinds.index(kind)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="osD^vPX*"[i % 8], color=_color(method),
                        linestyle=("-", "--", ":", "-.")[i % 4], label=f"{method} {kind}".strip())
            for r in mrows:
                if r["method"] == "fp16" and r.get(metric) is not None:
                    ax.axhline(r[metric], color="gray", linestyle=":", label="fp16")
                    break
            if metric.startswith("ppl_"):
                ax.set_yscale("log")
            ax.set_xticks(sorted({p[0] for pts in series.values() for p in pts}))
            ax.set_xlabel("weight bits")
            ax.set_ylabel(metric)
            ax.set_title(f"{model} ({group})" if group != "." else model)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            save(fig, f"bits_{_slug(group, model, metric)}.png")
        # per-layer proxy loss: runs that differ only in the method share one plot
        settings: dict[tuple, list[dict]] = defaultdict(list)
        for r in quant:
            if any("loss" in rec for rec in r["_layers"]):
                key = tuple(json.dumps(r.get(k)) for k in ("rotation", "W", "A", "KV", "wg", *extra))
                settings[key].append(r)
        for srows in settings.values():
            _plot_layers(plt, sorted(srows, key=lambda r: METHOD_ORDER.get(r["method"], 9)), model,
                         _setting_label(srows[0], extra), save, group)
    return written


# ---------------------------------------------------------------- CLI

def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m common.io.report", description=(
        "Aggregate every results.json below a folder into report.md, results.csv and PNG plots."))
    p.add_argument("folder", help="folder searched recursively for results.json files")
    p.add_argument("--out", default=None, help="output folder (default: <folder>/report)")
    p.add_argument("--paper", default=None, help="paper numbers (scripts/paper_numbers.json) to print beside ours")
    p.add_argument("--no_plots", action="store_true", help="write no PNG plots")
    p.add_argument("--digits", type=int, default=2, help="decimals in the markdown tables")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        entries = load_paper(args.paper) if args.paper else None
        rows, notes = load_rows(args.folder)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(n, file=sys.stderr)
    if not rows:
        print(f"error: no results.json of a quantization run below {args.folder}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(args.folder) / "report"
    text = report_markdown(rows, args.digits)
    if entries is not None:
        table, unmatched = compare_with_paper(rows, entries, args.digits)
        text += "\n\n### ours vs paper\n\n" + (table or "no run matches a paper number")
        text += f"\n\n{unmatched} of {len(entries)} paper numbers have no matching run here."
    print(text)
    _write_text(out / "report.md", text + "\n")
    _write_text(out / "results.csv", rows_csv(rows))
    plots = [] if args.no_plots else write_plots(rows, out / "plots")
    print(f"\nwrote {out / 'report.md'}, {out / 'results.csv'} and {len(plots)} plot(s) in {out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
