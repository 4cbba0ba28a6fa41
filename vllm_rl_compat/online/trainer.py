"""The trainer of the online run (the trainer's process): fp32 master weights,
AdamW, a GRPO-style clipped objective, and the weights of recent versions.

Two models, as in a mixed-precision trainer:

* ``master``: fp32 weights the optimizer updates. The gradient pass runs on it
  in fp32 (a bf16 backward runs at about 1/30 of fp32's speed on AVX2-only
  CPUs: 53 s vs 1.8 s for 8 x 56 tokens of SmolLM2-135M, measured here).
* ``policy``: the report's trainer reference (``parity.reference``: the model
  dtype with an fp32 head, or all fp32): the master cast to it after every
  step. Its forward gives every metric, and its weights, cast to the engine's
  dtype, are what the engine receives.

``snapshots`` keeps the policy weights of the last ``keep`` versions, so each
token can be scored again under the version that sampled it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vllm_rl_compat.online.stats import Sample, Scores, group_advantages
from vllm_rl_compat.parity.reference import (
    SamplingSpec,
    apply_sampling_transform,
    completion_logprobs,
    fp32_head_params,
    head_logits_fp32,
    load_model,
    sampled,
    torch_dtype,
)


class VersionGone(RuntimeError):
    """A token's version is older than the kept snapshots."""


class OnlineTrainer:
    """Scores, steps and versions one row's policy."""

    def __init__(self, model_dir: str, reference: str, dtype: str, spec: SamplingSpec,
                 lr: float, epsilon: float, group_size: int, keep: int = 4) -> None:
        self.spec, self.lr, self.epsilon, self.group_size = spec, lr, epsilon, group_size
        self.master = load_model(model_dir, torch.float32)
        self.policy = (self.master if reference == "fp32"
                       else load_model(model_dir, torch_dtype(dtype)))
        self.engine_dtype = torch_dtype(dtype)
        self.opt = torch.optim.AdamW(self.master.parameters(), lr=lr, weight_decay=0.0)
        self.version = 0
        self.keep = keep
        self.snapshots: dict[int, list[torch.Tensor]] = {0: self._policy_copy()}

    def _policy_copy(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.policy.parameters()]

    # ------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(self, samples: Sequence[Sample]) -> list[Scores]:
        """Current-version logprobs and entropy of every token, then each token
        again under the weights of the version that sampled it."""
        head = fp32_head_params(self.policy)
        scores = []
        for s in samples:
            lp = completion_logprobs(self.policy, head, self.spec, s.prompt, s.tokens)
            entropy = -(lp.exp() * lp.nan_to_num(neginf=0.0)).sum(-1)
            train = sampled(lp, s.tokens).tolist()
            scores.append(Scores(train, entropy.tolist(),
                                 [t if v == self.version else None
                                  for t, v in zip(train, s.versions)]))
        for version in sorted({v for s in samples for v in s.versions} - {self.version, None}):
            self._rescore(samples, scores, version)
        return scores

    def _rescore(self, samples: Sequence[Sample], scores: list[Scores], version: int) -> None:
        """Fill ``rescored`` for ``version``'s tokens with that version's weights."""
        if version not in self.snapshots:
            raise VersionGone(f"a token was sampled by weight version {version}, older than "
                              f"the {self.keep} versions the trainer keeps")
        current = self._policy_copy()
        self._load_policy(self.snapshots[version])
        try:
            head = fp32_head_params(self.policy)
            for s, sc in zip(samples, scores):
                if version in s.versions:
                    lp = sampled(completion_logprobs(self.policy, head, self.spec,
                                                     s.prompt, s.tokens), s.tokens).tolist()
                    sc.rescored = [x if v == version else old
                                   for x, v, old in zip(lp, s.versions, sc.rescored)]
        finally:
            self._load_policy(current)

    def _load_policy(self, tensors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, t in zip(self.policy.parameters(), tensors):
                p.copy_(t)

    # ------------------------------------------------------------ training
    def step(self, samples: Sequence[Sample]) -> float:
        """One optimizer step on the batch; returns the loss. Version + 1.

        Objective: token-mean PPO clip with ratio ``pi / mu`` (the engine's
        behaviour logprobs, as asynchronous RL trainers use them) and GRPO
        advantages (group-normalised rewards)."""
        advantages = group_advantages([s.reward for s in samples], self.group_size)
        total = sum(len(s.tokens) for s in samples)
        out = self.master.get_output_embeddings()  # fp32 master: no copy, differentiable
        head = (out.weight, getattr(out, "bias", None))
        loss_sum = 0.0
        self.opt.zero_grad(set_to_none=True)
        for s, adv in zip(samples, advantages):
            if not s.tokens or adv == 0.0:
                continue
            lp = sampled(completion_logprobs(self.master, head, self.spec, s.prompt, s.tokens),
                         s.tokens)
            ratio = torch.exp(lp - torch.tensor(s.behaviour, dtype=torch.float32))
            clipped = ratio.clamp(1 - self.epsilon, 1 + self.epsilon)
            loss = -torch.minimum(ratio * adv, clipped * adv).sum() / total
            loss.backward()
            loss_sum += float(loss.detach())
        if self.lr > 0:
            self.opt.step()
        self.version += 1
        with torch.no_grad():
            for p, m in zip(self.policy.parameters(), self.master.parameters()):
                if p is not m:
                    p.copy_(m)
        self.snapshots[self.version] = self._policy_copy()
        for old in [v for v in self.snapshots if v <= self.version - self.keep]:
            del self.snapshots[old]
        return loss_sum

    def engine_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The policy's weights in the engine's dtype, HF checkpoint names
        (tied parameters once)."""
        return [(name, p.detach().to(self.engine_dtype).contiguous())
                for name, p in self.policy.named_parameters()]

    @torch.inference_mode()
    def generate(self, prompt: list[int], n: int, max_tokens: int, eos: set[int],
                 seed: int) -> list[tuple[list[int], bool]]:
        """The reference row's sampler: ``n`` completions of ``prompt`` drawn from
        the policy's own processed distribution (same transform, fp32 head),
        batched over the ``n`` samples with the model's KV cache. Returns
        (tokens, ended by EOS) per sample."""
        gen = torch.Generator().manual_seed(seed)
        head = fp32_head_params(self.policy)
        ids = torch.tensor([prompt] * n, dtype=torch.long)
        past: Any = None
        tokens: list[list[int]] = [[] for _ in range(n)]
        ended = [False] * n
        for _ in range(max_tokens):
            res = self.policy.base_model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = head_logits_fp32(self.policy, res.last_hidden_state[:, -1], head)
            probs = apply_sampling_transform(logits, self.spec).exp()
            drawn = torch.multinomial(probs, 1, generator=gen)
            for i, token in enumerate(drawn[:, 0].tolist()):
                if not ended[i]:
                    tokens[i].append(token)
                    ended[i] = token in eos
            if all(ended):
                break
            ids = drawn
        return list(zip(tokens, ended))
