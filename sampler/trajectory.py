"""Teacher trajectories (docs/method.md): `(prompt_ids, final tokens, unmask order)` fully describes an
exact decode; state s_i is the final sequence with the positions order[i:] masked again."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sampler.decode import GenerateResult


@dataclass
class Trajectory:
    prompt_ids: list[int]
    tokens: list[int]  # the generated region, final
    order: list[int]  # positions of `tokens`, in the order they were unmasked
    traj_id: int = 0
    prompt_id: str = ""
    seed: int = 0

    def validate(self) -> None:
        if sorted(self.order) != list(range(len(self.tokens))):
            raise ValueError(f"trajectory {self.traj_id}: order is not a permutation of the "
                             f"{len(self.tokens)} generated positions")
        if not self.prompt_ids:
            raise ValueError(f"trajectory {self.traj_id}: empty prompt")

    def state(self, i: int, mask_id: int) -> list[int]:
        """s_i: prompt + generated tokens with order[i:] masked (s_0 all masked, s_n final)."""
        gen = list(self.tokens)
        for p in self.order[i:]:
            gen[p] = mask_id
        return list(self.prompt_ids) + gen


def from_result(result: GenerateResult, *, start_id: int = 0, seed: int = 0,
                prompt_ids_str: Sequence[str] | None = None) -> list[Trajectory]:
    """Trajectories of an exact decode (every position decoded, one per pass)."""
    out = []
    for b, (p, t, o) in enumerate(zip(result.prompt_ids, result.tokens, result.order, strict=True)):
        tr = Trajectory(list(p), list(t), list(o), traj_id=start_id + b, seed=seed,
                        prompt_id=prompt_ids_str[b] if prompt_ids_str else "")
        tr.validate()
        out.append(tr)
    return out


def k_weights(k_max: int, weighting: str = "inverse") -> np.ndarray:
    """Probability of each unroll depth K = 1..k_max: 'uniform' or 'inverse' (1/K, favours small K)."""
    ks = np.arange(1, k_max + 1, dtype=np.float64)
    if weighting == "uniform":
        w = np.ones_like(ks)
    elif weighting == "inverse":
        w = 1.0 / ks
    else:
        raise ValueError(f"unknown K weighting {weighting!r}: expected 'uniform' or 'inverse'")
    return w / w.sum()


@dataclass
class WindowBatch:
    """Windows s_i .. s_{i+K}: states[:, j] is s_{i+min(j, K)} (rows past their K repeat s_{i+K})."""

    states: Tensor  # [B, K_max + 1, L] token ids, left-padded
    attention_mask: Tensor | None  # [B, L] bool, None when nothing is padded
    ks: Tensor  # [B] unroll depth of each window
    target_pos: Tensor  # [B, M] positions still masked in s_{i+K}
    target_valid: Tensor  # [B, M] bool

    def to(self, device: torch.device | str) -> WindowBatch:
        am = None if self.attention_mask is None else self.attention_mask.to(device)
        return WindowBatch(self.states.to(device), am, self.ks.to(device), self.target_pos.to(device),
                           self.target_valid.to(device))


def build_windows(trajs: Sequence[Trajectory], starts: Sequence[int], ks: Sequence[int],
                  mask_id: int, pad_id: int, next_targets: int | None = None) -> WindowBatch:
    """Exact windows for given trajectories, start indices i and depths K (i + K <= n). The targets are
    the positions still masked in s_{i+K}, or with `next_targets` only the first that many of them in the
    teacher's order: the ones decoding reaches next."""
    k_top = max(ks)
    L = max(len(t.prompt_ids) + len(t.tokens) for t in trajs)
    B = len(trajs)
    states = torch.full((B, k_top + 1, L), pad_id, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.bool)
    targets: list[list[int]] = []
    for b, (t, i, k) in enumerate(zip(trajs, starts, ks, strict=True)):
        if not 0 <= i < i + k <= len(t.order):
            raise ValueError(f"window i={i}, K={k} outside trajectory {t.traj_id} of {len(t.order)}")
        n = len(t.prompt_ids) + len(t.tokens)
        off = L - n
        for j in range(k_top + 1):
            states[b, j, off:] = torch.tensor(t.state(i + min(j, k), mask_id))
        attn[b, off:] = True
        base = off + len(t.prompt_ids)
        targets.append([base + p for p in t.order[i + k:][:next_targets]])
    M = max(1, max(len(tp) for tp in targets))
    target_pos = torch.zeros(B, M, dtype=torch.long)
    target_valid = torch.zeros(B, M, dtype=torch.bool)
    for b, tp in enumerate(targets):
        target_pos[b, : len(tp)] = torch.tensor(tp, dtype=torch.long)
        target_valid[b, : len(tp)] = True
    return WindowBatch(states, None if bool(attn.all()) else attn, torch.tensor(list(ks)), target_pos,
                       target_valid)


def sample_windows(trajs: Sequence[Trajectory], batch_size: int, k_max: int, rng: np.random.Generator,
                   mask_id: int, pad_id: int, weighting: str = "inverse", *, eos_id: int | None = None,
                   eos_keep: float = 1.0, next_targets: int | None = None) -> WindowBatch:
    """Random windows: trajectory uniform, K from `k_weights`, start i uniform over valid starts.
    Windows must leave at least one masked position in s_{i+K} (there is nothing to predict else).
    With `eos_id`, a window whose K written tokens are all EOS is kept with probability `eos_keep`: the
    exact decode writes a short answer's EOS tail first and surely, so such windows teach almost
    nothing (on the embedded tasks they are 79% of task windows)."""
    if not 0 < eos_keep <= 1:
        raise ValueError(f"eos_keep must be in (0, 1], got {eos_keep}")
    w = k_weights(k_max, weighting)
    picked, starts, ks = [], [], []
    while len(picked) < batch_size:
        t = trajs[int(rng.integers(len(trajs)))]
        n = len(t.order)
        k = int(rng.choice(np.arange(1, k_max + 1), p=w))
        k = min(k, n - 1)
        if k < 1:
            raise ValueError(f"trajectory {t.traj_id} is too short ({n} tokens) for windows")
        i = int(rng.integers(0, n - k))  # i + k <= n - 1
        if eos_keep < 1 and eos_id is not None and all(t.tokens[p] == eos_id for p in t.order[i:i + k]):
            if rng.random() >= eos_keep:
                continue
        picked.append(t)
        starts.append(i)
        ks.append(k)
    return build_windows(picked, starts, ks, mask_id, pad_id, next_targets)
