"""The mismatch report: run each row's engine, score it, tabulate, write files.

A row is one engine configuration (plugin on/off, one fix disabled, ...).
Every row samples the same prompts with the same per-request seeds; the
trainer reference (``reference.ReferenceScorer``) then teacher-forces exactly
the tokens each row sampled, and ``metrics`` compares the two logprobs.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_rl_compat.parity.metrics import MismatchMetrics, compute_metrics, token_deltas
from vllm_rl_compat.parity.reference import ReferenceScorer, SamplingSpec
from vllm_rl_compat.parity.rollout import RolloutResult, RolloutSpec, run_rollouts

RL_ROW = "rl"


@dataclass(frozen=True)
class RowDef:
    """One engine configuration of the report."""

    key: str
    label: str
    rl_mode: bool
    rl_options: dict[str, Any] = field(default_factory=dict)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def env(self) -> dict[str, str]:
        """RL mode is a per-process switch, so each row sets it explicitly."""
        return {"VLLM_RL_COMPAT": "1" if self.rl_mode else "0"}

    @property
    def weight_roundtrip(self) -> bool:
        """RL rows with the weight-sync extension reload the weights once before
        sampling, so the check also covers logprobs after a weight update."""
        return self.rl_mode and self.rl_options.get("weight_sync", True)

    def all_engine_kwargs(self) -> dict[str, Any]:
        """Engine kwargs, with this row's ``rl_compat`` options when RL is on."""
        kwargs = dict(self.engine_kwargs)
        if self.rl_mode:
            kwargs["additional_config"] = {"rl_compat": dict(self.rl_options)}
        return kwargs


ROWS: dict[str, RowDef] = {row.key: row for row in (
    RowDef("stock", "stock", False, note="plugin off (VLLM_RL_COMPAT=0)"),
    RowDef(RL_ROW, "rl", True, note="all fixes on"),
    RowDef("rl-versioned_cache", "rl + versioned cache", True, {"prefix_cache": "versioned"},
           note="prefix caching on, keyed by weight version (the row's weight reload "
                "bumps the version before sampling)"),
    RowDef("rl-processed_logprobs", "rl - processed_logprobs", True,
           {"processed_logprobs": False}, note="raw logprobs (ignore temperature)"),
    RowDef("rl-v1_defaults", "rl - v1_defaults", True,
           {"disable_prefix_caching": False, "disable_async_scheduling": False},
           note="prefix caching + async scheduling back on"),
    RowDef("rl-weight_sync", "rl - weight_sync", True, {"weight_sync": False},
           note="no weight-sync extension, so no weight reload before sampling"),
    RowDef("rl-fp32_head", "rl - fp32_head", True, {"fp32_head": "off"},
           note="lm_head in the model dtype"),
    RowDef("native-best", "native best", False, {},
           {"logprobs_mode": "processed_logprobs", "enable_prefix_caching": False,
            "hf_overrides": {"head_dtype": "float32"}},
           note="plugin off; vLLM's own processed logprobs + fp32 head_dtype"),
)}
DEFAULT_ROWS: tuple[str, ...] = tuple(ROWS)


@dataclass
class CheckConfig:
    """Inputs of one check run (the CLI's arguments, resolved)."""

    model: str
    prompts: list[list[int]]
    rows: Sequence[str] = DEFAULT_ROWS
    dtype: str = "bfloat16"
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    seed: int = 0
    epsilon: float = 0.2
    reference: str = "bf16-fp32head"
    max_model_len: int = 1024
    kv_cache_gib: int = 1
    enforce_eager: bool = True
    out: Path = Path("rl-compat-report")
    layers: bool = False  # ``--layers``: per-layer comparison (``parity.layers``)
    reference_model: str | None = None  # the trainer's checkpoint, if not ``model``

    @property
    def trainer_model(self) -> str:
        return self.reference_model or self.model


@dataclass
class RowResult:
    """A finished row: the engine's tokens/logprobs, the trainer's, the metrics."""

    row: RowDef
    rollout: RolloutResult
    train_logprobs: list[list[float]]
    metrics: MismatchMetrics
    layers: dict[str, Any] | None = None  # ``--layers``: this row's layers.json entry

    def summary(self) -> dict[str, Any]:
        """Flat row for the table, CSV and JSON."""
        out = {"row": self.row.label, **self.metrics.as_dict(),
               "tokens_per_s": round(self.rollout.tokens_per_s, 2),
               "engine_start_s": round(self.rollout.engine_start_s, 1)}
        if self.layers is not None:
            out["first_diverging_layer"] = self.layers["first_diverging_layer"] or "none"
        return out


Progress = Callable[[str], None]


def run_check(cfg: CheckConfig, progress: Progress = lambda msg: None) -> list[RowResult]:
    """Run every row's engine, then score all rows with one reference model."""
    unknown = [r for r in cfg.rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    items = [(key, _rollout_spec(cfg, ROWS[key])) for key in cfg.rows]
    rollouts = run_rollouts(items, cfg.out / "rows", lambda i, key: progress(
        f"row {i + 1}/{len(items)}: {ROWS[key].label} (engine start + generate)"))
    progress(f"scoring with the trainer reference ({cfg.reference})")
    spec = SamplingSpec(cfg.temperature, cfg.top_p, cfg.top_k)
    scorer = ReferenceScorer(cfg.trainer_model, cfg.reference, cfg.dtype, spec)
    results = []
    for key, rollout in zip(cfg.rows, rollouts):
        train = scorer.score_many(zip(cfg.prompts, rollout.token_ids))
        metrics = compute_metrics(train, rollout.logprobs, cfg.epsilon)
        results.append(RowResult(ROWS[key], rollout, train, metrics))
    if cfg.layers:
        progress("comparing hidden states layer by layer (--layers)")
        _compare_layers(cfg, scorer, results)
    return results


def _capture_path(cfg: CheckConfig, key: str) -> Path:
    return cfg.out / "rows" / f"{key}.layers.pt"


def _compare_layers(cfg: CheckConfig, scorer: ReferenceScorer,
                    results: list[RowResult]) -> None:
    """Each row's per-layer errors and first diverging layer (``parity.layers``);
    the floor is measured once over the first row's tokens."""
    import torch

    from vllm_rl_compat.parity import layers
    from vllm_rl_compat.parity.reference import load_model, torch_dtype, fp32_head_params

    other = load_model(cfg.trainer_model, torch.float32 if cfg.reference != "fp32"
                        else torch_dtype(cfg.dtype))
    low, high = ((scorer.model, other) if cfg.reference != "fp32" else (other, scorer.model))
    floor = layers.rounding_floor(low, high, list(zip(cfg.prompts, results[0].rollout.token_ids)),
                                  (fp32_head_params(low), fp32_head_params(high)))
    for res in results:
        path = _capture_path(cfg, res.row.key)
        captured = torch.load(path)
        errors = layers.compare_row(captured, res.rollout.request_ids,
                                    list(zip(cfg.prompts, res.rollout.token_ids)),
                                    scorer.model, scorer._head)
        res.layers = layers.summarize(errors, floor)
        path.unlink()  # large (fp32 logits of every scored token)


def _rollout_spec(cfg: CheckConfig, row: RowDef) -> RolloutSpec:
    """The engine run for ``row``: shared sampling settings, the row's env/kwargs."""
    env = {**row.env(), "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib)}
    if cfg.layers:  # the capture functions travel to the workers by collective_rpc
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return RolloutSpec(
        model=str(cfg.model), prompts=cfg.prompts, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_tokens, seed=cfg.seed,
        dtype=cfg.dtype, max_model_len=cfg.max_model_len,
        enforce_eager=cfg.enforce_eager, env=env,
        engine_kwargs=row.all_engine_kwargs(), weight_roundtrip=row.weight_roundtrip,
        capture_path=str(_capture_path(cfg, row.key)) if cfg.layers else None,
    )


# ---------------------------------------------------------------- output files

TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("tokens", "tokens"),
    ("mean_abs_dlogp", "mean |Δlogp|"),
    ("rms_dlogp", "RMS Δlogp"),
    ("max_abs_dlogp", "max |Δlogp|"),
    ("kl_k3", "KL k3"),
    ("clip_rate", "clip@ε"),
    ("max_abs_dp", "max |Δp|"),
    ("prob_corr", "corr p"),
    ("support_mismatch", "-inf"),
    ("tokens_per_s", "tok/s"),
    ("engine_start_s", "start s"),
)


def format_value(value: Any) -> str:
    """Compact numbers for the table; ``None`` (undefined) shows as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"


def render_table(results: Sequence[RowResult], epsilon: float) -> Any:
    """A rich Table with one line per row (Δ = trainer - engine)."""
    from rich.table import Table

    table = Table(title=f"train-inference mismatch (Δ = trainer - engine, ε = {epsilon})")
    table.add_column("row", style="bold")
    columns = list(TABLE_COLUMNS)
    if any(res.layers is not None for res in results):
        columns.append(("first_diverging_layer", "first div. layer"))
    for _, header in columns:
        table.add_column(header, justify="right")
    for res in results:
        summary = res.summary()
        table.add_row(res.row.label, *(format_value(summary.get(k)) for k, _ in columns))
    return table


def write_outputs(cfg: CheckConfig, results: Sequence[RowResult],
                  elapsed_s: float) -> dict[str, Path]:
    """Write report.json, report.csv and report.png into ``cfg.out``."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    paths = {"json": cfg.out / "report.json", "csv": cfg.out / "report.csv",
             "png": cfg.out / "report.png"}
    paths["json"].write_text(json.dumps(_json_payload(cfg, results, elapsed_s), indent=1))
    _write_csv(paths["csv"], results)
    plot_report(results, paths["png"], cfg.epsilon)
    if cfg.layers:
        from vllm_rl_compat.parity.layers import write_layers

        paths.update(write_layers(cfg.out, {r.row.key: r.layers for r in results},
                                  {r.row.key: r.row.label for r in results}, cfg.reference))
    return paths


def _json_payload(cfg: CheckConfig, results: Sequence[RowResult],
                  elapsed_s: float) -> dict[str, Any]:
    """Settings, per-row summaries and engine settings, and per-token data."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("prompts", "out")}
    return {
        "settings": {**settings, "num_prompts": len(cfg.prompts)},
        "elapsed_s": round(elapsed_s, 1),
        "delta_convention": "train - infer; kl_k3 estimates KL(infer || train)",
        "rows": [{**res.summary(), "key": res.row.key, "note": res.row.note,
                  "engine_settings": res.rollout.engine_settings,
                  "sequences": [{"token_ids": t, "infer_logprobs": i,
                                 "train_logprobs": tr, "finish_reason": f}
                                for t, i, tr, f in zip(res.rollout.token_ids,
                                                       res.rollout.logprobs,
                                                       res.train_logprobs,
                                                       res.rollout.finish_reasons)]}
                 for res in results],
    }


def _write_csv(path: Path, results: Sequence[RowResult]) -> None:
    """One line per row with every metric."""
    rows = [res.summary() for res in results]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["row"])
        writer.writeheader()
        writer.writerows(rows)


def plot_report(results: Sequence[RowResult], path: Path, epsilon: float) -> None:
    """Per-token |Δlogprob| distributions per row, and clip-rate / KL bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [res.row.label for res in results]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.5 * len(results) + 3.5),
                             gridspec_kw={"width_ratios": [2.2, 1, 1]})
    floor = 1e-8  # exact matches (Δ = 0) shown at the floor of the log axis
    data = [np.maximum(np.abs(token_deltas(res.train_logprobs, res.rollout.logprobs)), floor)
            for res in results]
    positions = np.arange(len(results))[::-1]
    non_empty = [(d, p) for d, p in zip(data, positions) if d.size]
    if non_empty:
        axes[0].boxplot([d for d, _ in non_empty], positions=[p for _, p in non_empty],
                        vert=False, whis=(1, 99), showfliers=False)
        for d, p in non_empty:
            jitter = np.random.default_rng(0).uniform(-0.25, 0.25, d.size)
            axes[0].scatter(d, p + jitter, s=2, alpha=0.25)
    axes[0].set_xscale("log")
    axes[0].set_yticks(positions, labels)
    axes[0].set_xlabel("per-token |logp_trainer - logp_engine| (box: 1-99%; exact matches at 1e-8)")
    _bars(axes[1], labels, [res.metrics.clip_rate for res in results],
          f"clip rate (|ratio - 1| > {epsilon})", log=False)
    _bars(axes[2], labels, [res.metrics.kl_k3 for res in results],
          "KL(engine || trainer), k3", log=True)
    fig.suptitle("vllm-rl-compat check: trainer vs engine logprobs of sampled tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: Any, labels: list[str], values: list[float | None], title: str, log: bool) -> None:
    """Horizontal bars; undefined values are drawn empty and labelled n/a."""
    import numpy as np

    positions = np.arange(len(labels))[::-1]
    shown = [v if v is not None else 0.0 for v in values]
    if log:
        from matplotlib.ticker import LogLocator, NullFormatter

        shown = [max(v, 1e-12) for v in shown]
        ax.set_xscale("log")
        ax.set_xlim(min(shown) / 3, max(shown) * 8)  # room for the value labels
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.barh(positions, shown, color="tab:orange")
    if not log:
        ax.set_xlim(0, max(max(shown), 1e-9) * 1.3)  # room for the value labels
    for pos, val, width in zip(positions, values, shown):
        ax.text(width, pos, f" {format_value(val)}", va="center", fontsize=8)
    ax.set_yticks(positions, labels)
    ax.set_title(title)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Call ``fn`` and return (its result, seconds taken)."""
    start = time.perf_counter()
    return fn(), time.perf_counter() - start
