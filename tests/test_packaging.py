"""Installing limbic adds one import name, ``limbic``: the folders service/, monitors/ and vectors/ are its
sub-packages, so nothing collides with other packages called ``service`` or ``vectors``."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD_TOP_LEVEL = {"service", "monitors", "vectors"}


def test_the_wheel_installs_one_top_level_name_with_its_data(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("limbic-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"limbic"}
    for expected in (
        "limbic/service/cli.py",
        "limbic/monitors/vllm/plugin.py",
        "limbic/monitors/alerting/rules.py",
        "limbic/service/chat_templates/chatml_tools.jinja",
        "limbic/service/ui/static/index.html",
        "limbic/vectors/emotions.txt",
        "limbic/vectors/corpus/data/transcript_scenarios.txt",
    ):
        assert expected in names, expected
    assert any(n.startswith("limbic/vectors/data/") and n.endswith(".safetensors") for n in names)


def test_entry_points_name_the_namespace():
    dist = importlib.metadata.distribution("limbic")
    points = {(e.group, e.name): e.value for e in dist.entry_points}
    assert points[("console_scripts", "limbic")] == "limbic.service.cli:main"
    assert points[("vllm.general_plugins", "limbic")] == "limbic.monitors.vllm.plugin:register"


def test_no_code_imports_the_old_top_level_names():
    offenders = []
    for folder in ("service", "monitors", "vectors", "tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    roots = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    roots = [node.module.split(".")[0]]
                else:
                    continue
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for r in roots if r in OLD_TOP_LEVEL]
    assert not offenders


def test_outside_the_checkout_only_limbic_imports(tmp_path):
    check = (
        "import importlib.util, limbic.service.cli, limbic.monitors.engine, limbic.vectors.storage;"
        "print([n for n in ('service', 'monitors', 'vectors') if importlib.util.find_spec(n)])"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
