"""Put tests/ (for `from fixtures import ...`) and the repo root (for `import common`) at the front of sys.path."""
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
for _p in (str(_TESTS.parent), str(_TESTS)):
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)
