"""``vllm-rl-compat check --online``: options, rows in child processes, outputs.

Every option is validated before the first row starts. Each row runs in its
own process (``row``); a row that fails (its engine died, an update was
refused) ends with its error and the steps it finished, and the other rows
still run and report. Exit codes as ``check``: 0 ok, 1 a ``--fail-above``
limit exceeded by the ``rl`` row at some step, 2 bad input or a failed row.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from vllm_rl_compat.online.row import REFERENCE_ROW, RowSpec

DEFAULT_ROWS: tuple[str, ...] = (REFERENCE_ROW, "stock", "rl", "rl-processed_logprobs",
                                  "rl-v1_defaults")
METRICS: tuple[str, ...] = ("clip_rate", "kl", "mean_abs_log_ratio", "mismatch_kl",
                            "mismatch_abs")
"""Metrics ``--fail-above`` accepts with ``--online`` (checked at every step)."""
PLOTTED = (("clip_rate", "clip rate"), ("kl", "KL k3 (trainer vs engine)"),
           ("entropy", "entropy (nats)"), ("reward", "reward"),
           ("mismatch_kl", "mismatch-alone KL k3 (sampling version)"))


def row_names() -> tuple[str, ...]:
    from vllm_rl_compat.parity.report import ROWS

    return (REFERENCE_ROW, *ROWS)


@dataclass
class OnlineConfig:
    """A validated ``check --online`` run."""

    model: str
    prompts: list[list[int]]
    rows: list[str]
    steps: int = 10
    groups: int = 2
    samples: int = 4
    lr: float = 5e-5
    epsilon: float = 0.2
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 32
    seed: int = 0
    dtype: str = "bfloat16"
    reference: str = "bf16-fp32head"
    max_model_len: int = 1024
    kv_cache_gib: int = 1
    block_size: int = 32
    enforce_eager: bool = True
    out: Path = Path("rl-compat-report")
    thresholds: list[Any] = field(default_factory=list)


def check_options(args: Any) -> None:
    """Range checks of the online options, naming the bad one."""
    from vllm_rl_compat.parity.inputs import CheckInputError

    checks = [
        ("--steps", args.steps, args.steps >= 1, ">= 1"),
        ("--lr", args.lr, 0 <= args.lr < math.inf, ">= 0 and finite"),
        ("--samples", args.samples, args.samples >= 2,
         ">= 2 (group-normalised advantages need two samples per prompt)"),
        ("--groups", args.groups, args.groups >= 1, ">= 1"),
        ("--block-size", args.block_size, args.block_size >= 1 and args.block_size % 16 == 0,
         "a positive multiple of 16"),
    ]
    for name, value, ok, need in checks:
        if not ok:
            raise CheckInputError(f"{name} {value!r}: must be {need}")


def row_spec(cfg: OnlineConfig, key: str, folder: Path) -> RowSpec:
    """The child process's spec for row ``key``."""
    from vllm_rl_compat.parity.report import ROWS

    common = dict(key=key, model=cfg.model, prompts=cfg.prompts, steps=cfg.steps,
                  groups=cfg.groups, samples=cfg.samples, lr=cfg.lr, epsilon=cfg.epsilon,
                  temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                  max_tokens=cfg.max_tokens, seed=cfg.seed, dtype=cfg.dtype,
                  reference=cfg.reference, steps_path=str(folder / f"{key}.steps.jsonl"),
                  result_path=str(folder / f"{key}.result.json"),
                  max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib)}
    if key == REFERENCE_ROW:
        return RowSpec(**common, engine=False, weight_fix=False,
                       env={**env, "VLLM_RL_COMPAT": "0"})
    row = ROWS[key]
    return RowSpec(**common, weight_fix=row.weight_roundtrip,
                   engine_kwargs={**row.all_engine_kwargs(), "block_size": cfg.block_size},
                   env={**env, **row.env()})


Progress = Callable[[str], None]


def run_row(spec: RowSpec, folder: Path, progress: Progress,
            timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run one row's process; return its steps, result and error (if any)."""
    spec_path = folder / f"{spec.key}.spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    steps_path, log_path = Path(spec.steps_path), folder / f"{spec.key}.log"
    for path in (steps_path, Path(spec.result_path)):
        path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vllm_rl_compat.online.row",
                                 str(spec_path)], env={**os.environ, **spec.env},
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    shown, deadline = 0, time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        shown = _show_steps(steps_path, shown, spec, progress)
        time.sleep(0.5)  # progress display only; the result is read after exit
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    _show_steps(steps_path, shown, spec, progress)
    steps = _read_steps(steps_path)
    result: dict[str, Any] = {"steps": steps}
    if proc.returncode == 0 and Path(spec.result_path).is_file():
        result.update(json.loads(Path(spec.result_path).read_text()))
    else:
        why = ("timed out" if proc.returncode in (-9, None) and time.monotonic() >= deadline
               else f"exit {proc.returncode}")
        result["error"] = (f"row {spec.key!r} failed ({why}) after {len(steps)} of "
                           f"{spec.steps} steps; {log_path} ends with:\n{_tail(log_path)}")
    return result


def _read_steps(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _show_steps(path: Path, shown: int, spec: RowSpec, progress: Progress) -> int:
    steps = _read_steps(path)
    for rec in steps[shown:]:
        progress(f"{spec.key} step {rec['step'] + 1}/{spec.steps}: reward "
                 f"{_fmt(rec.get('reward'))}, clip {_fmt(rec.get('clip_rate'))}, "
                 f"KL {_fmt(rec.get('kl'))}, mismatch KL {_fmt(rec.get('mismatch_kl'))}, "
                 f"lag {_fmt(rec.get('lag_mean'))}")
    return len(steps)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _fmt(value: Any) -> str:
    from vllm_rl_compat.parity.report import format_value

    return format_value(value)


def summarize(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-row summary over its steps: means; the mismatch at step 0 (the
    static mismatch) and its worst step after an update, as a ratio; the
    reward's gain (mean of the last three steps minus the first three) and its
    step-to-step spread (mean |reward change| between consecutive steps). The
    worst step is also given on single-version tokens alone (no KV of an older
    version in their context), which is what the static mismatch measures."""
    def values(key: str, since: int = 0) -> list[float]:
        return [s[key] for s in steps[since:] if s.get(key) is not None]

    def mean(v: list[float]) -> float | None:
        return sum(v) / len(v) if v else None

    rewards, after = values("reward"), values("mismatch_kl", since=1)
    static = steps[0].get("mismatch_kl") if steps else None
    worst = max(after) if after else None
    single = values("mismatch_kl_single_version", since=1)
    return {
        "steps": len(steps),
        **{key: mean(values(key)) for key in ("clip_rate", "kl", "entropy", "mismatch_kl",
                                              "lag_mean", "mismatch_kl_stale_prefix")},
        "static_mismatch_kl": static, "mismatch_kl_max": worst,
        "mismatch_ratio_max": worst / static if worst is not None and static else None,
        "single_version_ratio_max": max(single) / static if single and static else None,
        "reward_gain": (mean(rewards[-3:]) - mean(rewards[:3])
                        if len(rewards) >= 2 else None),
        "reward_step_spread": mean([abs(b - a) for a, b in zip(rewards, rewards[1:])]),
        "spanning_sequences": sum(values("version_spanning_sequences")),
        "stale_prefix_tokens": (sum(values("stale_prefix_tokens"))
                                if values("stale_prefix_tokens") else None),
    }


def compare(payload: dict[str, Any], high: str = "stock", low: str = "rl") -> list[str]:
    """At how many steps row ``high`` is above row ``low`` on clip rate and KL."""
    rows = payload["rows"]
    if high not in rows or low not in rows:
        return []
    pairs = list(zip(rows[high]["steps"], rows[low]["steps"]))
    lines = []
    for key in ("clip_rate", "kl"):
        above = sum(a[key] > b[key] for a, b in pairs
                    if a.get(key) is not None and b.get(key) is not None)
        lines.append(f"{high} above {low} on {key} at {above} of {len(pairs)} steps")
    return lines


def run_online(cfg: OnlineConfig, progress: Progress) -> dict[str, Any]:
    """Every row, one after another; returns the ``online.json`` payload."""
    from vllm_rl_compat.parity.report import ROWS

    folder = cfg.out / "online-rows"
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    for i, key in enumerate(cfg.rows):
        progress(f"row {i + 1}/{len(cfg.rows)}: {key} ({cfg.steps} steps)")
        res = run_row(row_spec(cfg, key, folder), folder, progress)
        label, note = ((key, "no engine: the trainer samples with its own weights")
                       if key == REFERENCE_ROW else (ROWS[key].label, ROWS[key].note))
        rows[key] = {"label": label, "note": note, **res, "summary": summarize(res["steps"])}
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("prompts", "out", "thresholds")}
    settings.update(num_prompts=len(cfg.prompts), temperature=cfg.temperature)
    return {"settings": settings, "rows": rows}


def write_outputs(payload: dict[str, Any], out: Path) -> dict[str, Path]:
    """``online.json``, ``online.csv`` (one line per row and step), ``online.png``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "online.json", "csv": out / "online.csv", "png": out / "online.png"}
    paths["json"].write_text(json.dumps(payload, indent=1, default=str))
    lines = [{"row": key, **step} for key, row in payload["rows"].items()
             for step in row["steps"]]
    fields = list(dict.fromkeys(k for line in lines for k in line)) or ["row"]
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(lines)
    plot(payload, paths["png"])
    return paths


def plot(payload: dict[str, Any], path: Path) -> None:
    """Five panels (clip rate, KL, entropy, reward, mismatch-alone KL) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 4))
    for ax, (key, title) in zip(axes, PLOTTED):
        for row in payload["rows"].values():
            pts = [(s["step"], s[key]) for s in row["steps"] if s.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=row["label"])
        if key in ("kl", "mismatch_kl"):
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    s = payload["settings"]
    fig.suptitle(f"vllm-rl-compat check --online: {Path(s['model']).name}, T = "
                 f"{s['temperature']}, lr {s['lr']}, {s['groups']} x {s['samples']} samples "
                 f"per step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


SUMMARY_COLUMNS = (("steps", "steps"), ("clip_rate", "clip"), ("kl", "KL"),
                   ("mismatch_kl", "mismatch KL"), ("static_mismatch_kl", "step 0"),
                   ("mismatch_ratio_max", "worst/step 0"),
                   ("single_version_ratio_max", "worst/step 0, 1-version KV"),
                   ("entropy", "entropy"),
                   ("reward_gain", "reward gain"), ("reward_step_spread", "reward spread"),
                   ("lag_mean", "lag"), ("spanning_sequences", "spanning"),
                   ("stale_prefix_tokens", "stale-prefix tok"))


def render_table(payload: dict[str, Any]) -> Any:
    """The summary table (means over steps)."""
    from rich.table import Table

    eps = payload["settings"]["epsilon"]
    table = Table(title=f"online run: means over steps (ε = {eps}; mismatch = each token "
                        f"under the version that sampled it)")
    table.add_column("row", style="bold")
    for _, header in SUMMARY_COLUMNS:
        table.add_column(header, justify="right")
    for row in payload["rows"].values():
        table.add_row(row["label"] + (" (failed)" if row.get("error") else ""),
                      *(_fmt(row["summary"].get(k)) for k, _ in SUMMARY_COLUMNS))
    return table


def apply_thresholds(payload: dict[str, Any], thresholds: list[Any], err: Any) -> int:
    """1 if the ``rl`` row's metric exceeds its limit at any step (or is missing)."""
    steps = payload["rows"].get("rl", {}).get("steps", [])
    failed = False
    for th in thresholds:
        values = [s.get(th.metric) for s in steps]
        worst = max((v for v in values if v is not None), default=None)
        if worst is None or worst > th.limit:
            failed = True
            err.print(f"[red]FAIL[/red] rl row: {th.metric} = {worst} > {th.limit} "
                      f"(worst step of {len(steps)})", highlight=False)
        else:
            err.print(f"ok: rl row {th.metric} <= {th.limit} at every step "
                      f"(worst {worst:.4g})", highlight=False)
    return 1 if failed else 0


def execute(cfg: OnlineConfig, err: Any) -> int:
    """Run, write, print the table; the exit code."""
    from rich.console import Console

    start = time.perf_counter()
    with err.status("starting") as status:
        def progress(msg: str) -> None:
            err.log(msg)
            status.update(msg)
        payload = run_online(cfg, progress)
        payload["elapsed_s"] = round(time.perf_counter() - start, 1)
        paths = write_outputs(payload, cfg.out)
    out = Console()
    if not out.is_terminal:
        out = Console(width=180)
    out.print(render_table(payload))
    failed = [row["error"] for row in payload["rows"].values() if row.get("error")]
    for line in compare(payload):
        err.print(line, highlight=False)
    for message in failed:
        err.print(f"[red]error:[/red] {message}", highlight=False)
    err.print(f"{len(payload['rows'])} rows in {payload['elapsed_s']:.0f} s; wrote "
              f"{', '.join(str(p) for p in paths.values())}", highlight=False)
    code = apply_thresholds(payload, cfg.thresholds, err)
    return 2 if failed else code
