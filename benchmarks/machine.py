"""The header every results file starts with: when, what code, which machine, how loaded.

Results files are written by their benchmark scripts only; this header lets a
reader tell which CPU kind a number belongs to (AMX / AVX512-BF16 / AVX2 only
behave very differently here) and whether the machine was busy.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else "unknown"


def cpu_kind() -> str:
    """``amx``, ``avx512bf16``, ``avx2`` or ``other``: the kinds this project runs on."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512bf16"
    return "avx2" if "avx2" in flags else "other"


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" (with uncommitted changes)" if dirty else "")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def header_fields(load_before: str) -> dict[str, str]:
    """What every results file records; call ``load()`` before measuring for ``load_before``."""
    flags = cpu_flags()
    isa = ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in
                    (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"), ("AVX2", "avx2")))
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT),
                                                           *sys.argv[1:]])
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit(),
            "CPU": f"{cpu_model()} ({cpu_kind()}: {isa}), {os.cpu_count()} cores",
            "load average (1/5/15 min)": f"before {load_before}, after {load()}",
            "command": f"`{command}`"}


def header(title: str, load_before: str) -> str:
    """Markdown header of a results file (see ``header_fields``)."""
    lines = [f"- {key}: {value}" for key, value in header_fields(load_before).items()]
    return "\n".join([f"# {title}", "", *lines, ""])


def write_json(path: Path, results: object, load_before: str) -> None:
    """A results file's raw data, under the same header as its markdown twin."""
    path.write_text(json.dumps({"header": header_fields(load_before), "results": results},
                               indent=1))


def write_results(stem: str, lines: list[str]) -> Path:
    """Write ``results/<stem>_<cpu kind>.md`` (``lines`` start with ``header``), echo it."""
    out = ROOT / "benchmarks" / "results" / f"{stem}_{cpu_kind()}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return out


def table(columns: list[str], rows: list[str]) -> list[str]:
    """A markdown table's lines: the header of ``columns``, its rule, ``rows``."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows]
