"""scripts/: bash syntax, --help, dry runs that print (and do not run) front-end commands whose flags the front ends
accept, the run loop (resume, JOBS) with a stand-in interpreter, and the offline path without datasets/lm_eval."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))
TABLES = [p for p in SCRIPTS if p.name.startswith("table_")] + [REPO / "scripts" / "reproduce_offline.sh"]
FAKE = "/nonexistent/python"  # the interpreter of dry runs: anything actually run would fail


def _run(script: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": FAKE, **(env or {})}
    for key in ("DRY_RUN", "MODEL", "MODELS", "DATA", "JOBS", "FORCE", "EXTRA_ARGS"):
        if env is None or key not in env:
            full.pop(key, None)
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full, timeout=60)


def _parser(script: str):
    if script == "fake_quant/main.py":
        from common.cli.llm import build_parser
    elif script == "spinquant/main.py":
        from spinquant.main import build_parser
    elif script == "spinquant/optimize_rotation.py":
        from spinquant.optimize_rotation import build_parser
    elif script == "vit_quant/main.py":
        from common.cli.vit import build_parser
    else:
        raise AssertionError(f"unexpected command {script}")
    return build_parser()


def test_expected_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"lib.sh", "get_assets.sh", "reproduce_offline.sh", "table_quarot_llama.sh", "table_spinquant_llama.sh",
            "table_weight_only.sh", "table_vit.sh", "table_cost.sh", "table_ablations.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", TABLES, ids=lambda p: p.name)
def test_help(script, tmp_path):
    r = _run(script, "--help", env={"OUT": str(tmp_path / "out")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: ") and script.name in r.stdout.splitlines()[0] and "DRY_RUN" in r.stdout and "Environment" in r.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", TABLES, ids=lambda p: p.name)
@pytest.mark.parametrize("how", ["env", "flag"])
def test_dry_run_prints_valid_commands(script, how, tmp_path):
    out = tmp_path / "out"
    env = {"OUT": str(out), **({"DRY_RUN": "1"} if how == "env" else {})}
    args = ["--quick"] if script.name == "reproduce_offline.sh" else []
    r = _run(script, *args, *(["--dry_run"] if how == "flag" else []), env=env)
    assert r.returncode == 0, r.stderr
    assert not out.exists(), "a dry run created files"
    runs = [shlex.split(line) for line in r.stdout.splitlines() if line.startswith(FAKE + " ") and
            ".py" in line.split()[1]]
    assert runs, r.stdout
    dirs = set()
    for cmd in runs:
        assert cmd[0] == FAKE
        args = cmd[2:]
        _parser(cmd[1]).parse_args(args)  # every flag exists in the front end (argparse exits 2 otherwise)
        out_dir = args[args.index("--output_dir") + 1]
        assert out_dir.startswith(str(out) + "/")
        dirs.add(out_dir)
    assert len(dirs) == len(runs), "two runs share an output folder"
    last = shlex.split(r.stdout.strip().splitlines()[-1])
    assert last[:3] == [FAKE, "-m", "common.io.report"] and last[3].startswith(str(out) + "/")


def test_quarot_table_loops(tmp_path):
    r = _run(REPO / "scripts" / "table_quarot_llama.sh", "--dry_run",
             env={"OUT": str(tmp_path), "MODELS": "org/A org/B", "TASKS": ""})
    lines = [l for l in r.stdout.splitlines() if "fake_quant/main.py" in l]
    assert len(lines) == 2 * (1 + 2 * 3)  # per model: fp16, then KV4/KV16 x rtn/gptq/gptaq
    assert sum("--k_bits 4" in l for l in lines) == 6 and not any("--lm_eval" in l for l in lines)
    assert sum("--gptaq" in l for l in lines) == 4 and all("--rotate" in l for l in lines if "_fp16" not in l)


def test_bad_arguments(tmp_path):
    r = _run(REPO / "scripts" / "table_cost.sh", "--bogus", env={"OUT": str(tmp_path)})
    assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr
    r = _run(REPO / "scripts" / "table_vit.sh", env={"OUT": str(tmp_path)})
    assert r.returncode == 2 and "DATA is not set" in r.stderr and not r.stdout
    r = _run(REPO / "scripts" / "table_ablations.sh", "--dry_run", env={"OUT": str(tmp_path), "ABLATIONS": "nope"})
    assert r.returncode == 2 and "unknown ablation 'nope'" in r.stderr


STAND_IN = """#!/usr/bin/env bash
# stand-in interpreter: `-m common.io.report` goes to the real python, a main.py call writes a results.json
if [[ $1 == -m ]]; then exec {python} "$@"; fi
out=; prev=
for a in "$@"; do [[ $prev == --output_dir ]] && out=$a; prev=$a; done
echo "$*" >> {calls}
mkdir -p "$out"
printf '{{"model": "org/M", "quantization": {{"method": "gptq", "w_bits": 4, "a_bits": 4, "k_bits": 16,
 "v_bits": 16, "rotate": true}}, "perplexity": {{"wikitext2": 7.5}}, "config": {{}}, "layers": []}}' \\
  > "$out/results.json"
"""


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_run_loop_resumes_and_reports(tmp_path, jobs):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(STAND_IN.format(python=sys.executable, calls=calls))
    fake.chmod(0o755)
    env = {"OUT": str(tmp_path / "out"), "PYTHON": str(fake), "MODELS": "org/A org/B", "JOBS": jobs}
    script = REPO / "scripts" / "table_cost.sh"
    r = _run(script, env=env)
    assert r.returncode == 0, r.stderr
    assert len(calls.read_text().splitlines()) == 4
    assert "| M | gptq | quarot | 4 | 4 | 16 | 7.50 |" in r.stdout  # the final report
    assert (tmp_path / "out" / "cost" / "report" / "results.csv").is_file()
    r = _run(script, env=env)  # everything done: nothing re-run
    assert r.returncode == 0 and len(calls.read_text().splitlines()) == 4
    assert r.stdout.count("# already done:") == 4


def test_offline_path_needs_no_datasets_or_lm_eval(tmp_path):
    """fake_quant/main.py with local .txt files must not import datasets / lm_eval (the GPU machine lacks them)."""
    from fixtures import make_tiny_causal_lm, write_text

    model = make_tiny_causal_lm("llama", tmp_path / "m")
    cal, ev = write_text(tmp_path / "cal.txt", 2000, seed=0), write_text(tmp_path / "eval.txt", 400, seed=1)
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('datasets', 'lm_eval'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.argv = ['fake_quant/main.py', '--model', {str(model)!r}, '--dtype', 'float32', '--device', 'cpu',\n"
        f"            '--nsamples', '2', '--seqlen', '16', '--cal_dataset', {str(cal)!r}, '--eval_dataset',\n"
        f"            {str(ev)!r}, '--rotate', '--w_bits', '4', '--a_bits', '4', '--k_bits', '4', '--v_bits', '4',\n"
        f"            '--gptaq', '--output_dir', {str(tmp_path / 'o')!r}]\n"
        "import runpy\n"
        "runpy.run_path('fake_quant/main.py', run_name='__main__')\n"
        "assert not any(m.split('.')[0] in ('datasets', 'lm_eval') for m in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "o" / "results.json").read_text())["quantization"]["method"] == "gptaq"
