"""``limbic serve`` with the old per-token monitoring path (``bench/api_overhead.py``'s ``legacy()``) switchable
at run time: SIGUSR1 puts it in place of the current one, SIGUSR2 puts the current one back. One server, both
paths, under the same load: the before/after comparison of ``ab.py``.

    .venv/bin/python bench/results/profile/serve.py [--legacy] serve --port 8151
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/: api_overhead, record

if __name__ == "__main__":  # vLLM's spawned processes import this module too: only the server runs it
    import api_overhead
    from limbic.service.cli import main

    restore = None  # while the legacy path is in place: what puts the current one back

    def use_legacy(on: bool) -> None:
        global restore
        if on and restore is None:
            restore = api_overhead.install_legacy()
        elif not on and restore is not None:
            restore()
            restore = None
        print(f"limbic profile: {'legacy' if on else 'current'} monitoring path", file=sys.stderr, flush=True)

    signal.signal(signal.SIGUSR1, lambda *_: use_legacy(True))
    signal.signal(signal.SIGUSR2, lambda *_: use_legacy(False))
    if "--legacy" in sys.argv:
        sys.argv.remove("--legacy")
        use_legacy(True)
    sys.exit(main())
