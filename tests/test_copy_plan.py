"""The recorded copy plan (``weights.copy_plan``) on a toy model with vLLM-shaped
loaders: a packed qkv linear filled by three shard loads (``counted_param``),
a plain norm, an embedding with zeroed padding rows. Replaying the record must
give exactly what running the loader gives, on other values; loaders whose
writes cannot be replayed must be refused with the reason. The real models are
covered in ``test_weight_sync.py`` (overlapped updates, exact logprobs)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from vllm_rl_compat.weights.worker.apply_cpu import counted_param
from vllm_rl_compat.weights.worker.copy_plan import CopyPlan, PlanRecorder, replay_item, unrecorded

SHARDS = ("q", "k", "v")


def qkv_loader(param: torch.Tensor, loaded: torch.Tensor, shard: str) -> None:
    """Two rows per shard, taken from rows 1-2 of a 3-row tensor (a TP narrow)."""
    i = SHARDS.index(shard)
    param.data.narrow(0, 2 * i, 2).copy_(loaded.narrow(0, 1, 2))


class Toy(torch.nn.Module):
    def __init__(self, how: str = "ok") -> None:
        super().__init__()
        self.how, self.packed = how, []
        meta = torch.empty(6, 4, dtype=torch.bfloat16, device="meta")
        meta.weight_loader = qkv_loader
        self.qkv, self.filling = counted_param(
            meta, self, lambda: torch.empty(6, 4, dtype=torch.bfloat16), self._pack)
        self.norm = torch.nn.Parameter(torch.empty(4), requires_grad=False)
        self.emb = torch.nn.Parameter(torch.empty(5, 4, dtype=torch.bfloat16),
                                      requires_grad=False)

    def _pack(self) -> None:  # like the re-pack: keep the values, empty the weight
        with unrecorded():
            self.packed.append(self.qkv.data.float() * 1)
        self.qkv.data = torch.empty(0, dtype=torch.bfloat16)

    @property
    def slots(self) -> list[torch.nn.Parameter]:
        return [self.qkv, self.norm, self.emb]

    def load_weights(self, items: Any) -> None:
        for name, t in items:
            if name in SHARDS:
                self.qkv.weight_loader(self.qkv, t, name)
            elif name == "norm":
                self._load_norm(t)
            else:
                self.emb.data[:4].copy_(t)
                self.emb.data[4:].fill_(0)  # padding row

    def _load_norm(self, t: torch.Tensor) -> None:
        if self.how == "scaled":
            self.norm.data.copy_(t * 2)
        elif self.how == "replaced":
            self.norm.data = t.clone()
        elif self.how == "added":
            self.norm.data.add_(t)
        elif self.how == "overlapping":
            self.norm.data.copy_(t)
            self.emb.data[0].copy_(t)  # the embedding's row 0 is written twice
        else:
            self.norm.data.copy_(t)


def update(seed: int, dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    items = [(s, torch.randn(3, 4, generator=gen).to(dtype)) for s in SHARDS]
    return items + [("norm", torch.randn(4, generator=gen)),
                    ("emb", torch.randn(4, 4, generator=gen).to(dtype))]


def record(toy: Toy, items: list) -> CopyPlan | str:
    recorder = PlanRecorder(toy.slots, packed={0})
    with recorder, torch.no_grad():
        toy.load_weights(recorder.track(items))
    return recorder.finish()


def loaded(toy: Toy) -> list[torch.Tensor]:
    return [*toy.packed, toy.norm.data.clone(), toy.emb.data.clone()]


def replay(toy: Toy, plan: CopyPlan, items: list,
           by_loader: Callable[[str], bool] = lambda name: False) -> None:
    with torch.no_grad():
        for name, t in items:
            if by_loader(name):
                toy.load_weights([(name, t)])
            else:
                assert plan.fits(name, t)
                replay_item(plan, name, t, toy.slots, {0: toy.filling})


def test_replay_equals_the_loader_on_other_values():
    plan = record(Toy(), update(0))
    assert isinstance(plan, CopyPlan), plan
    assert sum(len(w) for w in plan.writes.values()) == 6  # 3 shards, norm, emb + padding
    want, got = Toy(), Toy()
    want.load_weights(update(1))
    replay(got, plan, update(1))
    assert len(got.packed) == 1  # packed once, when the last shard arrived
    for a, b in zip(loaded(want), loaded(got), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got.emb.data[4], torch.zeros(4, dtype=torch.bfloat16))


def test_replay_and_loader_fill_one_packed_layer_between_them():
    """A tensor the plan does not fit goes through the loader; the packed layer's
    completion is counted across both (``Filling``)."""
    plan = record(Toy(), update(0))
    items = update(2)
    items[1] = ("k", items[1][1].float())  # another dtype than recorded
    assert not plan.fits(*items[1])
    want, got = Toy(), Toy()
    want.load_weights(items)
    replay(got, plan, items, by_loader=lambda name: name == "k")
    assert len(got.packed) == 1
    for a, b in zip(loaded(want), loaded(got), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("how, reason", [
    ("scaled", "copies a computed tensor"),
    ("replaced", "replaced the storage of 1 parameter"),
    ("added", "writes into a parameter with aten.add_"),
    ("overlapping", "writes where another tensor of the update writes too"),
])
def test_loaders_that_cannot_be_replayed_are_refused(how, reason):
    result = record(Toy(how), update(0))
    assert isinstance(result, str) and reason in result, result


def test_recording_sees_only_its_own_thread():
    """The mode is thread-local: writes made by another thread while a
    recording is open (the engine thread stepping) are not recorded."""
    import threading

    toy = Toy()
    recorder = PlanRecorder(toy.slots, packed={0})
    with recorder, torch.no_grad():
        other = threading.Thread(target=lambda: toy.norm.data.add_(1.0))
        other.start()
        other.join()
        toy.load_weights(recorder.track(update(0)))
    assert isinstance(recorder.finish(), CopyPlan)
