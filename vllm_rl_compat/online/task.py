"""The online run's task: a prompt pool shipped with the package and a reward.

Why this task: the reward must move within ten steps on a 135M instruct model,
and it must be dense enough that samples of one prompt differ (GRPO learns
nothing from a group whose rewards are equal). Brevity does both: short
factual questions, where SmolLM2-135M-Instruct sometimes answers in one line
and sometimes runs on, and a reward of ``1 - length / max_tokens`` for a
completion the model ended itself (0 for one cut off by ``max_tokens``).
``check --online`` samples the first ``--num-prompts`` of them (default 2, so
every step samples the same prompts: the reward's step-to-step spread is
sampling noise, not a change of prompts); they recur at every step, so a
prefix cache can serve prompt KV computed under older weights.
"""

from __future__ import annotations

QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "How many days are in a week?",
    "What colour is the sky on a clear day?",
    "What is 2 plus 3?",
    "Name the largest planet in our solar system.",
    "What do bees make?",
    "What is the opposite of hot?",
    "Which animal says moo?",
    "What is the freezing point of water in Celsius?",
    "What language is spoken in Brazil?",
    "How many legs does a cat have?",
    "What is the chemical symbol for gold?",
    "Who wrote Romeo and Juliet?",
    "What is the square root of 81?",
    "Which season comes after winter?",
    "What is the tallest animal in the world?",
)
INSTRUCTION = "Answer in a few words."
PROMPTS: tuple[str, ...] = tuple(f"{q} {INSTRUCTION}" for q in QUESTIONS)


def reward(num_tokens: int, finished: bool, max_tokens: int) -> float:
    """``1 - num_tokens / max_tokens`` if the model ended the completion itself
    (EOS or a stop token), else 0: shorter self-ended answers score higher."""
    if not finished or max_tokens <= 0:
        return 0.0
    return max(0.0, 1.0 - num_tokens / max_tokens)
