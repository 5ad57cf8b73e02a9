"""The JSON every benchmark writes: the command that made it, the machine, the time, then its figures."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def write(out: Path, figures: dict[str, Any], echo: bool = True, **machine: Any) -> None:
    """Writes the record to ``out`` (and prints it unless ``echo`` is false: a script that saves partial
    results after each step writes often)."""
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            **machine,
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **figures,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    if echo:
        print(json.dumps(record, indent=2))
