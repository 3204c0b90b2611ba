"""Maximum Likelihood Reinforcement Learning (MaxRL), a minimal reference implementation.

MaxRL (Tajwar et al. 2026, arXiv 2602.02710). For a prompt x with binary reward, let
p = p_theta(x) be the probability that one sampled completion is correct. RL maximises p;
maximum likelihood would maximise log p = -sum_{k>=1} (1-p)^k / k, a series of pass@k terms
of which RL keeps only the first. MaxRL keeps the first T terms, and its gradient is a
re-weighted policy gradient:

    J_T(x) = -sum_{k=1..T} (1-p)^k / k        grad J_T = w_T(p) grad p,   w_T(p) = (1-(1-p)^T) / p

T = 1 is RL (w = 1), T -> infinity is maximum likelihood (w = 1/p, hard prompts weigh more).

The algorithm is identical to RLOO / GRPO training (sample N completions per prompt, score
them 0/1, weight each completion's log-probability by an advantage) except:
  1. the advantage is A_j = (r_j - mean) / mean = N r_j / K - 1  (K = successes in the group),
     i.e. the policy-gradient sum is normalised by the number of successes K, not by N;
     GRPO divides by the standard deviation instead, RLOO by nothing;
  2. groups with no success (K = 0) contribute nothing (Algorithm 1). This estimator is
     exactly unbiased for J_T with T = N - 1. Keeping the control variate -1 in all-fail
     groups (`maxrl_order_n`) gives order T = N (Theorem 2). From the same N rollouts,
     `maxrl@T` estimates order T for any T <= N (DESIGN.md 2b);
  3. nothing else: no KL, no clipping, no entropy bonus, fully on-policy.

Run (CPU is fine; see README.md for wall times):
    python maxrl.py --task=nav --N=16                                 rloo, grpo, maxrl side by side
    python maxrl.py --task=nav --N=16 --train-pool=64                 the same, data-scarce regime
    python maxrl.py --task=arith --methods=ml,maxrl,grpo,rloo --N=16  ml = exact cross-entropy
    python maxrl.py --experiment=weights                              weight-function figure
    python maxrl.py --experiment=gradnorm                             gradient norm vs pass rate
    python maxrl.py --experiment=gradcos                              cosine to the ML gradient vs N
    python maxrl.py --experiment=interpolation --single-token        maxrl -> cross-entropy as N grows
    python maxrl.py --experiment=order                                higher order T, or more rollouts N?
    python maxrl.py --experiment=variance                             gradient variance at equal order
    python maxrl.py --experiment=scaling                              -log pass@k vs N on mazes
    python maxrl.py --bench                                           speed of the fast paths
    torchrun --standalone --nproc_per_node=2 maxrl.py --task=nav      data parallel (main command)
    pytest                                                            the estimators' proofs

Sections: 1. estimators  2. model  3. sampling and log-probs  4. evaluation
5. checking the estimators on the real model  6. training  7. reporting  8. experiments
9. command line.
"""

import argparse
import functools
import hashlib
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import toy_tasks
from toy_tasks import make_task

# ----------------------------------------------------------------------------------------
# 1. Estimators. Each maps binary rewards (..., N) of a group of N completions of one prompt
#    to advantages (..., N). The gradient estimate for the prompt is (1/N) sum_j A_j S_j with
#    S_j = grad log pi(z_j | x), the sum of the completion's token log-prob gradients.

class Estimators(dict):
    """name -> advantage function. The fixed estimators below are stored, so iterating gives
    them; a parametrised one (maxrl@4, passk@16) is built on each lookup by family_member."""

    def __missing__(self, name):
        return family_member(name)


ESTIMATORS = Estimators()


def binary_only(advantage_fn):
    """The advantage function, refusing non-binary rewards (MaxRL divides by the mean)."""

    @functools.wraps(advantage_fn)
    def checked(rewards):
        if not ((rewards == 0) | (rewards == 1)).all():
            raise ValueError("rewards must be binary (0 or 1): MaxRL divides by the group mean")
        return advantage_fn(rewards)
    return checked


def estimator(advantage_fn):
    """Register an advantage function under its name."""
    ESTIMATORS[advantage_fn.__name__] = binary_only(advantage_fn)
    return ESTIMATORS[advantage_fn.__name__]


@estimator
def reinforce(rewards):  # A_j = r_j                                 unbiased for grad pass@1
    return rewards.clone()


@estimator
def rloo(rewards):  # A_j = r_j - (K - r_j) / (N - 1)               unbiased for grad pass@1
    N = rewards.shape[-1]
    if N < 2:
        raise ValueError("rloo needs N >= 2 (the leave-one-out baseline averages N - 1 others)")
    n_success = rewards.sum(-1, keepdim=True)  # (..., 1)
    return rewards - (n_success - rewards) / (N - 1)


@estimator
def grpo(rewards, eps=1e-6):  # A_j = (r_j - mean) / (std + eps)      no closed-form objective
    mean = rewards.mean(-1, keepdim=True)  # (..., 1)
    std = (mean * (1 - mean)).sqrt()  # population std of 0/1 rewards; exactly 0 when K in {0, N}
    return (rewards - mean) / (std + eps)


@estimator
def maxrl(rewards):  # Algorithm 1: A_j = (r_j - mean) / mean = N r_j / K - 1; K = 0 gives 0
    mean = rewards.mean(-1, keepdim=True)  # (..., 1)
    return (rewards - mean) / torch.where(mean > 0, mean, 1.0)  # unbiased for J_T, T = N - 1


@estimator
def maxrl_order_n(rewards):  # Theorem 2: as maxrl, but A_j = -1 in all-fail groups (K = 0)
    all_fail = rewards.sum(-1, keepdim=True) == 0  # (..., 1)
    return maxrl(rewards) - all_fail.to(rewards.dtype)  # unbiased for J_T, T = N


# The whole family (DESIGN.md 2b): from the same N rollouts, any order T <= N, and pass@k. Each
# advantage depends on (r_j, K) only: a table over K = 0..N (float64, from subset counts in
# product form, finite for any N), looked up per group. F = N - K failures; C(a, b) = 0 if b > a.

FAMILIES = {}  # family name -> (pattern, advantage_fn(rewards, order))


def family(pattern):
    """Register advantage_fn(rewards, order) as the family PATTERN = 'name@T' (looked up as name@4)."""

    def register(advantage_fn):
        FAMILIES[pattern.partition("@")[0]] = (pattern, advantage_fn)
        return advantage_fn
    return register


def family_member(name):
    """ESTIMATORS[FAMILY@ORDER]: the family's advantage function at that order, checked
    against each group's N when called. Unknown names and bad orders raise ValueError."""
    family_name, _, order = name.partition("@")
    if family_name not in FAMILIES:
        patterns = ", ".join(pattern for pattern, _ in FAMILIES.values())
        raise ValueError(f"unknown estimator {name!r} (choose from {', '.join(ESTIMATORS)}, {patterns})")
    pattern, advantage_fn = FAMILIES[family_name]
    letter = pattern.partition("@")[2]
    if not (order.isascii() and order.isdigit() and int(order) >= 1):
        raise ValueError(f"{name!r}: {pattern} needs an integer {letter} >= 1")
    order = int(order)

    def advantage(rewards):
        if order > rewards.shape[-1]:
            raise ValueError(f"{name} needs {letter} <= N (got groups of N={rewards.shape[-1]})")
        return advantage_fn(rewards, order)
    return binary_only(advantage)


def all_fail_fractions(n, c, k):
    """C(n-c, m) / C(n, m) for m = 0..k: the fraction of the m-subsets of n samples, c of them
    correct, that hold no correct one. Vectorised over c: (...) -> (..., k+1). Product form,
    stable for large n: C(n-c, m) / C(n, m) = prod_{i<m} (n-c-i) / (n-i)."""
    c = np.asarray(c, dtype=np.float64)[..., None]  # (..., 1)
    factors = np.clip((n - c - np.arange(k)) / (n - np.arange(k)), 0.0, None)  # (..., k)
    return np.concatenate([np.ones_like(c), factors.cumprod(-1)], -1)


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (vectorised over c)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (got k={k}, n={n})")
    return 1.0 - all_fail_fractions(n, c, k)[..., k]


def per_group(table, rewards):
    """table[K] for each group's number of successes K. table (N+1,), rewards (..., N) -> (..., 1)."""
    n_success = rewards.sum(-1, keepdim=True).long()  # (..., 1)
    return torch.as_tensor(table, dtype=rewards.dtype, device=rewards.device)[n_success]


@family("passk@k")  # PKPO-style: grad pass@k averaged over all k-subsets of the group
def pass_at_k_advantage(rewards, k):  # success: k; failure: k [1 - C(F-1, k-1) / C(N-1, k-1)]
    N = rewards.shape[-1]
    others_all_fail = all_fail_fractions(N - 1, np.arange(N + 1), k - 1)[:, -1]  # (N+1,) K among N-1
    failure = k * (1.0 - others_all_fail)  # (N+1,)
    return torch.where(rewards == 1, float(k), per_group(failure, rewards))  # w = k (1-p)^(k-1)


@family("maxrl_u@T")  # U-statistic: sum_{k<=T} (1/k) grad pass@k, minus the constant T - 1
def maxrl_u_statistic(rewards, T):  # success: 1; failure: -sum_{m=1..T-1} C(F-1, m) / C(N-1, m)
    N = rewards.shape[-1]
    others_all_fail = all_fail_fractions(N - 1, np.arange(N + 1), T - 1)  # (N+1, T) m = 0..T-1
    failure = 1.0 - others_all_fail.sum(-1)  # (N+1,) the m = 0 term is 1
    return torch.where(rewards == 1, 1.0, per_group(failure, rewards))  # w = (1 - (1-p)^T) / p


@family("maxrl@T")  # the paper's 1/K estimator averaged over all T-subsets, minus the mean score
def maxrl_conditional(rewards, T):  # success: N c_T(K) - 1 = (N / K) pass@T-hat - 1; failure: -1
    # c_T(K) = (1/C(N,T)) sum_k (1/k) C(K-1, k-1) C(F, T-k) = (1 - C(F,T) / C(N,T)) / K,
    # since C(K-1, k-1) / k = C(K, k) / K: the unbiased pass@T of the group over K
    N = rewards.shape[-1]
    n_success = np.arange(N + 1)  # K
    success = N * pass_at_k(N, n_success, T) / np.maximum(n_success, 1) - 1  # (N+1,)
    return torch.where(rewards == 1, per_group(success, rewards), -1.0)  # w = (1 - (1-p)^T) / p


def estimator_problem(name, N):
    """Why ESTIMATORS[name] cannot take groups of N rewards (the message), or None if it can."""
    try:
        ESTIMATORS[name](torch.zeros(N))
    except ValueError as err:
        return str(err)


def policy_gradient_loss(seq_logprob, advantages):
    """-(1/N) sum_j A_j log pi(z_j|x), averaged over prompts. (B, N), (B, N) -> scalar.

    Sequence-level: seq_logprob sums the completion's token log-probs. A token-mean would
    weight long completions differently and is a different estimator. The value of this loss
    means nothing; watch the reward."""
    N = seq_logprob.shape[-1]
    return -(advantages.detach() * seq_logprob).sum(-1).div(N).mean()


def weight(name, p, N):
    """Exact finite-N weight w_N(p) of ESTIMATORS[name]: E[(1/N) sum_j A_j S_j] = w_N(p) grad p.

    With a(r, K) the advantage of a completion with reward r in a group with K successes,
    conditioning on the other N - 1 rewards (k successes among them, k ~ Binom(N - 1, p)) and
    using E[S 1{r=1}] = grad p, E[S 1{r=0}] = -grad p:
        w_N(p) = sum_{k=0}^{N-1} Binom(k; N-1, p) [a(1, k+1) - a(0, k)].
    Computed from the advantage function alone, so every registered estimator gets one."""
    advantage = ESTIMATORS[name]
    k = torch.arange(N, dtype=torch.float64)  # successes among the other N - 1 completions
    position = torch.arange(N, dtype=torch.float64)
    group_with_success = (position <= k[:, None]).double()  # (N, N) row k: k+1 successes, first is one
    group_with_failure = (position < k[:, None]).double()  # (N, N) row k: k successes, last is zero
    gain = advantage(group_with_success)[:, 0] - advantage(group_with_failure)[:, -1]  # (N,)
    p_t = torch.as_tensor(np.asarray(p, dtype=np.float64))[..., None]  # (..., 1)
    log_binom = (math.lgamma(N) - torch.lgamma(k + 1) - torch.lgamma(N - k)
                 + torch.special.xlogy(k, p_t) + torch.special.xlogy(N - 1 - k, 1 - p_t))
    w = (log_binom.exp() * gain).sum(-1)  # (...)
    return float(w) if np.ndim(p) == 0 else w.numpy()


# ----------------------------------------------------------------------------------------
# 2. Model: a small decoder-only transformer (as the paper's maze model: RoPE, RMSNorm, SiLU,
#    tied embeddings), whose forward takes an optional key/value cache of earlier tokens.

@dataclass
class ModelConfig:
    vocab_size: int
    block_size: int  # longest prompt + completion
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 96


def rotary_tables(block_size, head_dim, base=10000.0):
    inv_freq = base ** -(torch.arange(0, head_dim, 2).float() / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(block_size).float(), inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):  # x (B, H, T, D); cos, sin (T, D/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of the tokens so far, one buffer per layer with room for `capacity`
    tokens. Each prompt's keys/values (B, H, P, D) are copied once into the rows of its n
    completions; appending writes in place, so a decoding step never re-copies the past."""

    def __init__(self, prompt_kv, n, capacity):
        B, H, _, D = prompt_kv[0][0].shape
        self.keys = [k.new_empty(B * n, H, capacity, D) for k, _ in prompt_kv]
        self.values = [v.new_empty(B * n, H, capacity, D) for _, v in prompt_kv]
        self.fill(prompt_kv, n)

    def fill(self, prompt_kv, n):  # (B, H, P, D) per layer -> the first P positions of each row
        for layer, (k, v) in enumerate(prompt_kv):
            B, H, P, D = k.shape
            self.keys[layer].view(B, n, H, -1, D)[:, :, :, :P] = k[:, None]
            self.values[layer].view(B, n, H, -1, D)[:, :, :, :P] = v[:, None]
        self.length = P  # tokens filled so far

    def append(self, layer, k, v):  # (B*n, H, T, D) each -> all keys, values so far (B*n, H, P+T, D)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.n_head, self.layer = cfg.n_head, layer
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None):  # x (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, T, D)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # is_causal would align the mask top-left; queries here sit after P cached keys
            k, v = cache.append(self.layer, k, v)  # (B, H, P+T, D)
            P = k.shape[2] - T
            mask = None if T == 1 else torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # one new token sees every key
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.n_embd), nn.RMSNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg, layer)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False), nn.SiLU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False))

    def forward(self, x, cos, sin, cache=None):
        attn_out, kv = self.attn(self.norm1(x), cos, sin, cache)
        x = x + attn_out
        return x + self.mlp(self.norm2(x)), kv


class Transformer(nn.Module):
    cuda_graphs = None  # set by --cuda-graphs (section 8): sampling then replays CUDA graphs

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd)
        cos, sin = rotary_tables(cfg.block_size, cfg.n_embd // cfg.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx, cache=None):
        """idx (B, T) tokens that follow the cache's P tokens -> logits (B, T, V) and each
        layer's keys/values (B, H, P+T, D); a KVCache is extended in place."""
        past_len = 0 if cache is None else cache.length
        cos = self.cos[past_len:past_len + idx.shape[1]]  # (T, D/2)
        sin = self.sin[past_len:past_len + idx.shape[1]]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=idx.is_cuda):  # bf16 on GPUs
            x = self.embed(idx)  # (B, T, C)
            layer_kv = []
            for block in self.blocks:
                x, kv = block(x, cos, sin, cache)
                layer_kv.append(kv)
            logits = self.norm(x) @ self.embed.weight.T  # tied embeddings: (B, T, V)
        if cache is not None:
            cache.length += idx.shape[1]
        return logits.float(), layer_kv


# ----------------------------------------------------------------------------------------
# 3. Sampling and log-probs. Completions are (B, N, Tc) token ids with lengths (B, N): tokens
#    at positions >= length are padding (after the stop token, or never sampled).

def sample_token(logits, generator):  # (R, V) -> (R, 1)
    """torch.multinomial(logits.softmax(-1), 1) without its host sync. For one sample,
    multinomial checks p on the host (a GPU waits for that), then draws q ~ Exp(1) per token
    and takes argmax p / q (the exponential race, a form of the Gumbel-max trick). We make
    the same draw, same tokens (a test checks), and check p asynchronously instead."""
    probs = logits.softmax(-1)  # (R, V)
    torch._assert_async(probs.isfinite().all(), "sampling from non-finite logits: did training diverge?")
    race = torch.empty_like(probs).exponential_(generator=generator)  # (R, V), Exp(1)
    return (probs / race).argmax(-1, keepdim=True)


@torch.no_grad()  # not inference_mode: the sampled tokens go on into the training forward
def sample_completions(model, prompts, n, max_len, stop_id, generator, use_cache=True):
    """Sample n completions per prompt at temperature 1. prompts (B, Tp) -> (B, n, Tc), (B, n).

    With use_cache, each prompt is run once and its keys/values are shared by its n
    completions; then one token per step. Without, the whole sequence is recomputed each step
    (slow; kept to test and benchmark the cache). Both draw the same random numbers."""
    B = prompts.shape[0]
    sequences = prompts.repeat_interleave(n, 0)  # (B*n, Tp)
    if use_cache:
        logits, prompt_kv = model(prompts)
        logits = logits[:, -1].repeat_interleave(n, 0)  # (B*n, V)
        if max_len > 1:  # one token: no decoding
            decode = one_token_decoder(model, prompt_kv, n, capacity=prompts.shape[1] + max_len)
    # Asking whether all have stopped makes the host wait for the GPU; on a GPU we ask every
    # 8 tokens (the extra tokens are masked below). On a CPU asking is free: every token.
    check_every = 1 if prompts.device.type == "cpu" else 8
    finished = torch.zeros(B * n, dtype=torch.bool, device=prompts.device)
    lengths = torch.full((B * n,), max_len, device=prompts.device)
    tokens = []
    for t in range(max_len):
        if not use_cache:
            logits = model(sequences)[0][:, -1]  # (B*n, V)
        next_token = sample_token(logits, generator)  # (B*n, 1)
        tokens.append(next_token)
        stops_now = (next_token[:, 0] == stop_id) & ~finished
        lengths = torch.where(stops_now, t + 1, lengths)  # (B*n,)
        finished |= stops_now
        if t == max_len - 1 or (t % check_every == check_every - 1 and finished.all()):
            break  # the last token needs no forward pass
        if use_cache:
            logits = decode(next_token)
        else:
            sequences = torch.cat([sequences, next_token], dim=1)
    completions = torch.cat(tokens, dim=1)  # (B*n, Tc)
    after_end = torch.arange(completions.shape[1], device=prompts.device) >= lengths[:, None]
    completions[after_end] = 0  # <pad>, id 0 in every task
    return completions.view(B, n, -1), lengths.view(B, n)


def one_token_decoder(model, prompt_kv, n, capacity):
    """Decoding's step: token (B*n, 1) -> logits (B*n, V) of the next token, extending a KV
    cache that starts as the prompts' keys/values. Plain PyTorch; with --cuda-graphs, a
    replay of recorded CUDA graphs that compute exactly the same (CUDAGraphs, section 8)."""
    if model.cuda_graphs is not None:
        return model.cuda_graphs.decoder(prompt_kv, n, capacity)
    cache = KVCache(prompt_kv, n, capacity)
    return lambda token: model(token, cache)[0][:, -1]


def completion_logprobs(model, prompts, completions, lengths):
    """Sum of each completion's token log-probs (with grad). (B, Tp), (B, N, Tc), (B, N) -> (B, N).

    Shared prefix: each prompt runs once and its N completions attend to its cached keys and
    values, which keep their graph, so gradients are exactly those of the full sequences."""
    B, N, Tc = completions.shape
    prompt_logits, prompt_kv = model(prompts)  # (B, Tp, V)
    flat = completions.reshape(B * N, Tc)  # (B*N, Tc)
    logits = prompt_logits[:, -1:].repeat_interleave(N, 0)  # (B*N, 1, V) predicts token 0
    if Tc > 1:
        cache = KVCache(prompt_kv, N, capacity=prompts.shape[1] + Tc - 1)
        rest, _ = model(flat[:, :-1], cache)  # (B*N, Tc-1, V)
        logits = torch.cat([logits, rest], dim=1)  # (B*N, Tc, V)
    token_logprob = logits.log_softmax(-1).gather(-1, flat[..., None])[..., 0]  # (B*N, Tc)
    mask = torch.arange(Tc, device=flat.device) < lengths.reshape(B * N, 1)  # (B*N, Tc)
    return (token_logprob * mask).sum(-1).view(B, N)


def full_sequence_logprobs(model, prompts, completions, lengths):
    """Reference for completion_logprobs: each completion run with its own copy of the prompt,
    no sharing. Same inputs and output; N times the prompt work. (The benchmark and a test.)"""
    B, N, Tc = completions.shape
    sequences = torch.cat([prompts.repeat_interleave(N, 0), completions.reshape(B * N, Tc)], 1)
    logits, _ = model(sequences[:, :-1])  # (B*N, Tp+Tc-1, V)
    targets = sequences[:, -Tc:, None]  # (B*N, Tc, 1)
    token_logprob = logits[:, -Tc:].log_softmax(-1).gather(-1, targets)[..., 0]  # (B*N, Tc)
    mask = torch.arange(Tc, device=prompts.device) < lengths.reshape(B * N, 1)
    return (token_logprob * mask).sum(-1).view(B, N)


def prompt_tensor(task, problems, device):
    return torch.tensor([task.encode_prompt(p) for p in problems], device=device)  # (B, Tp)


def reference_logprob(model, task, problems, prompts):
    """log pi(reference completion | x) per problem, with grad: (B,). With unique answers
    (arith) this is log p exactly; it is also the warm start's and `ml`'s objective."""
    refs = [task.reference_completion(p) for p in problems]
    Tc = max(map(len, refs))
    padded = torch.tensor([r + [task.pad_id] * (Tc - len(r)) for r in refs], device=prompts.device)
    lengths = torch.tensor([[len(r)] for r in refs], device=prompts.device)  # (B, 1)
    return completion_logprobs(model, prompts, padded[:, None], lengths)[:, 0]  # groups of one


def score(task, problems, completions, lengths):
    """Verifier rewards, (B, N) float 0/1."""
    rows = [[task.reward(p, c[:n]) for c, n in zip(cs, ns)]
            for p, cs, ns in zip(problems, completions.tolist(), lengths.tolist())]
    return torch.tensor(rows, dtype=torch.float32, device=completions.device)


# ----------------------------------------------------------------------------------------
# 4. Evaluation on the held-out split: pass@k for k = 1, 2, 4, ... and coverage.

def eval_ks(N):
    """k = 1, 2, 4, ... up to the first power of two >= N (at least 2)."""
    return [2**i for i in range(max(N - 1, 1).bit_length() + 1)]


@torch.no_grad()
def evaluate(model, task, ks, seed, batch=32, n_failures=3):
    """Held-out metrics. pass@k is exact, 1 - (1-p)^k with p by teacher forcing, when the task's
    answers are unique (arith); otherwise the unbiased estimator from n = max(ks) samples.
    coverage is the fraction of prompts with at least one success among the n samples."""
    n, device = max(ks), model.embed.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    successes, exact_p, failures = [], [], []
    for start in range(0, len(task.test_problems), batch):
        problems = task.test_problems[start:start + batch]
        prompts = prompt_tensor(task, problems, device)
        completions, lengths = sample_completions(model, prompts, n, task.max_completion_len,
                                                  task.stop_id, generator)
        rewards = score(task, problems, completions, lengths)  # (B, n)
        successes.append(rewards.sum(-1).cpu())
        if task.unique_answers:
            exact_p.append(reference_logprob(model, task, problems, prompts).exp().cpu())
        failures += [task.render(p, c[0][:l[0]]) for p, c, l, r in
                     zip(problems, completions.tolist(), lengths.tolist(), rewards) if r[0] == 0]
    c = torch.cat(successes).numpy()
    p = torch.cat(exact_p).double().numpy() if task.unique_answers else c / n
    metrics = {f"pass@{k}": float(np.mean(1 - (1 - p) ** k if task.unique_answers
                                          else pass_at_k(n, c, k))) for k in ks}
    metrics["coverage"] = float(np.mean(c > 0))
    return metrics, p, failures[:n_failures]


# ----------------------------------------------------------------------------------------
# 5. Checking the estimators on the real model (the tests and --experiment=weights use this).
#    A completion "succeeds" when it starts with a target token list; then p = pi(target | x)
#    is exact by teacher forcing. With target = answer + <eos> this is arith's verifier.

def exact_group_gradient(name, logits, correct, N):
    """E[(1/N) sum_j A_j grad log pi(z_j)] for a categorical policy pi = softmax(logits) over
    M outcomes, correct (M,) 0/1, summed exactly over all M^N outcome tuples: no sampling.
    Returns (expected gradient wrt the logits (M,), probs (M,), score (M, M) with row z =
    grad log pi(z)). The tests and notebook 02 check estimators against weight() with it."""
    M = len(logits)
    probs = logits.softmax(-1)  # (M,)
    score = torch.eye(M, dtype=logits.dtype) - probs  # (M, M) row z: grad_logits log pi(z)
    outcomes = torch.tensor(list(itertools.product(range(M), repeat=N)))  # (M^N, N)
    tuple_prob = probs[outcomes].prod(-1)  # (M^N,)
    advantages = ESTIMATORS[name](correct[outcomes])  # (M^N, N)
    per_tuple = (advantages[..., None] * score[outcomes]).sum(1) / N  # (M^N, M)
    return (tuple_prob[:, None] * per_tuple).sum(0), probs, score


def target_pass_rate(model, prompt, target):
    """Exact p = pi(target | x), with grad. prompt (Tp,), target: list of ids -> scalar."""
    target_ids = torch.tensor(target, device=prompt.device)[None, None]  # (1, 1, L)
    lengths = torch.tensor([[len(target)]], device=prompt.device)
    return completion_logprobs(model, prompt[None], target_ids, lengths)[0, 0].exp()


def flat_grad(scalar, model, retain_graph=False):
    grads = torch.autograd.grad(scalar, list(model.parameters()), retain_graph=retain_graph)
    return torch.cat([g.reshape(-1) for g in grads])  # (n_params,)


def estimator_weighting(name):
    """Coefficients c (G, N) such that sum c_j S_j is the mean over G groups of (1/N) sum_j A_j S_j."""
    return lambda rewards: ESTIMATORS[name](rewards) / rewards.numel()


def sampled_gradients(model, prompt, target, N, weightings, n_batches, groups, generator, max_len, stop_id):
    """Monte Carlo gradients for one prompt. Each of n_batches samples `groups` groups of N
    completions; for each weighting fn(rewards (G, N)) -> c (G, N) it records
    sum_gj c_gj grad log pi(z_gj | x). Returns {name: (n_batches, n_params)}."""
    target_ids = torch.tensor(target, device=prompt.device)
    prompts = prompt[None].expand(groups, -1)  # (G, Tp)
    batches = {name: [] for name in weightings}
    for _ in range(n_batches):
        completions, lengths = sample_completions(model, prompts, N, max_len, stop_id, generator)
        completions = F.pad(completions, (0, max(0, len(target) - completions.shape[-1])))
        starts_right = (completions[..., :len(target)] == target_ids).all(-1)  # (G, N)
        rewards = (starts_right & (lengths >= len(target))).float()  # (G, N)
        seq_logprob = completion_logprobs(model, prompts, completions, lengths)  # (G, N)
        for name, coefficients in weightings.items():
            objective = (coefficients(rewards) * seq_logprob).sum()
            batches[name].append(flat_grad(objective, model, retain_graph=True))
    return {name: torch.stack(grads) for name, grads in batches.items()}


# ----------------------------------------------------------------------------------------
# 6. Training: one shared supervised warm start, then each method from the same weights,
#    seed and prompt stream, with the same number of sampled rollouts per step. A method's
#    whole state can be checkpointed and resumed; Ctrl-C stops it cleanly; under torchrun
#    each process trains on its share of every batch.

def supervised_loss(model, task, problems, device):
    """-mean log pi(reference | x): the warm start's loss, and exact maximum likelihood
    (method `ml`) where the reference is the unique correct answer."""
    return -reference_logprob(model, task, problems, prompt_tensor(task, problems, device)).mean()


def rl_loss(model, task, problems, method, N, generator, device):
    """Sample N completions per prompt, score them, and build the method's loss."""
    prompts = prompt_tensor(task, problems, device)  # (B, Tp)
    completions, lengths = sample_completions(model, prompts, N, task.max_completion_len,
                                              task.stop_id, generator)  # (B, N, Tc), (B, N)
    rewards = score(task, problems, completions, lengths)  # (B, N)
    advantages = ESTIMATORS[method](rewards)  # (B, N)
    loss = policy_gradient_loss(completion_logprobs(model, prompts, completions, lengths), advantages)
    no_signal = (advantages == 0).all(-1).float().mean()  # groups whose gradient is zero
    return loss, {"reward": rewards.mean().item(), "no_signal": no_signal.item()}


class Objective(nn.Module):
    """One forward = one method's whole loss on a batch (the policy runs several times inside:
    sampling, prompt, completions). Under torchrun it is wrapped in DistributedDataParallel,
    which then sees one forward per backward and averages the gradients over the processes;
    each process holds whole groups, so advantages need no communication."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, method, task, problems, N, generator, device):
        if method == "ml":
            return supervised_loss(self.policy, task, problems, device), {}
        return rl_loss(self.policy, task, problems, method, N, generator, device)

    @staticmethod
    def for_run(model, args):
        """The objective for this process: plain, or wrapped in DDP under torchrun."""
        if args.world == 1:
            return Objective(model)
        device_ids = [model.embed.weight.device.index] if model.embed.weight.is_cuda else None
        return DistributedDataParallel(Objective(model), device_ids=device_ids, broadcast_buffers=False)


def progress(iterable, args, **kwargs):
    """A tqdm progress bar, on the first process only."""
    return tqdm(iterable, **kwargs, **({"disable": True} if args.rank else {}))


def warm_start(model, task, args, device):
    """Supervised fine-tuning on reference completions (BFS shortest paths, true answers).
    Its result depends only on what warm_start_key hashes, so it is cached on disk."""
    if args.sft_steps == 0:
        return
    cache_file = Path(args.cache_dir) / f"warm-start-{warm_start_key(args, device)}.pt"
    if not args.no_cache and load_cached_weights(model, cache_file):
        print(f"warm start: loaded from {cache_file} (--no-cache recomputes it)")
        return
    objective = Objective.for_run(model, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    rng = random.Random(f"sft-{args.seed}")
    for _ in progress(range(args.sft_steps), args, desc="warm start"):
        problems = task.sample_train(args.sft_batch, rng)[args.rank::args.world]  # this rank's share
        loss, _ = objective("ml", task, problems, None, None, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if not args.no_cache:
        save_rank0(model.state_dict(), cache_file, args)


class Stop:
    """Set by Ctrl-C: training finishes the current step, saves what it has and stops."""
    requested = False


def request_stop(signum, frame):
    if Stop.requested:  # a second Ctrl-C stops at once
        raise KeyboardInterrupt
    Stop.requested = True
    print("\nCtrl-C: stopping after this step (again to stop at once)", file=sys.stderr)


def fresh_start(init_state, initial_metrics, args, device):
    """Where train_method starts at step 0; a checkpoint holds the same keys at a later step."""
    return {"step": 0, "model": init_state, "optimizer": None,
            "prompt_rng": random.Random(f"prompts-{args.seed}").getstate(),  # same prompts for every method
            "generator": torch.Generator(device).manual_seed(args.seed + 1_000_003 * args.rank).get_state(),
            "curve": [{"step": 0, "rollouts": 0, **initial_metrics}], "window": [], "failures": [],
            "wall_s": 0.0}


def train_step(method, objective, optimizer, task, problems, args, generator, device):
    """One on-policy update (or one cross-entropy step for `ml`) on this process's share of the
    step's prompts; returns its statistics."""
    loss, stats = objective(method, task, problems[args.rank::args.world], args.N, generator, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under torchrun, the gradients are averaged over processes here
    stats["grad_norm"] = nn.utils.clip_grad_norm_(objective.parameters(), float("inf")).item()
    optimizer.step()
    return stats


def stop_everywhere(args, device):
    """Ctrl-C reaches the processes at slightly different steps: stop when any one has it."""
    if args.world == 1:
        return Stop.requested
    flag = torch.tensor([float(Stop.requested)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train_method(method, model, task, args, device, start, ks, save_checkpoint=None):
    """Train one method from `start` (fresh_start or a checkpoint) to --steps, evaluating pass@k
    for k in ks every --eval-every steps. Every --ckpt-every steps, and when Ctrl-C stops it
    early, its full state goes to save_checkpoint, so a resumed run ends exactly where an
    uninterrupted one would. Returns its curve, final metrics and wall time."""
    started = time.time() - start["wall_s"]
    model.load_state_dict(start["model"])
    objective = Objective.for_run(model, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if start["optimizer"] is not None:
        optimizer.load_state_dict(start["optimizer"])
    prompt_rng, generator = random.Random(), torch.Generator(device)
    prompt_rng.setstate(start["prompt_rng"])
    generator.set_state(start["generator"])
    curve, window, failures, step = start["curve"], start["window"], start["failures"], start["step"]
    bar = progress(range(step + 1, args.steps + 1), args, initial=step, total=args.steps,
                   desc=f"{method:>5} N={args.N:<4} seed {args.seed}")
    for step in bar:
        problems = task.sample_train(args.batch, prompt_rng)  # the same on every process
        stats = train_step(method, objective, optimizer, task, problems, args, generator, device)
        window.append(stats)
        if step % args.eval_every == 0 or step == args.steps:
            metrics, _, failures = evaluate(model, task, ks, seed=args.seed + 1)
            train_stats = {key: float(np.mean([s[key] for s in window])) for key in window[0]}
            curve.append({"step": step, "rollouts": step * args.batch * args.N, **metrics,
                          **{f"train_{key}": value for key, value in train_stats.items()}})
            window = []
        stop = stop_everywhere(args, device)
        if save_checkpoint and (stop or (args.ckpt_every and step % args.ckpt_every == 0)):
            save_checkpoint({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "prompt_rng": prompt_rng.getstate(), "generator": generator.get_state(),
                             "curve": curve, "window": window, "failures": failures,
                             "wall_s": time.time() - started})
        bar.set_postfix(reward=stats.get("reward", float("nan")), test_pass1=curve[-1]["pass@1"])
        if stop:
            break
    interrupted = step < args.steps
    if interrupted and curve[-1]["step"] != step:  # report the weights it stopped with
        curve = curve + [{"step": step, "rollouts": step * args.batch * args.N,
                          **evaluate(model, task, ks, seed=args.seed + 1)[0]}]
    return {"final": curve[-1], "curve": curve, "wall_s": time.time() - started,
            "failures": failures, "interrupted": interrupted}


# ----------------------------------------------------------------------------------------
# 7. Reporting: table, results.json, plots.

def print_table(initial, warm_start_s, results, ks):
    """Held-out metrics after the warm start ("start") and after each method's training."""
    columns = [f"pass@{k}" for k in ks] + ["coverage"]
    print(f"\n{'method':>13} " + " ".join(f"{c:>9}" for c in columns) + f" {'wall s':>8}")
    rows = [("start", initial, warm_start_s)] + [(m, r["final"], r["wall_s"]) for m, r in results.items()]
    for name, metrics, wall in rows:
        print(f"{name:>13} " + " ".join(f"{metrics[c]:>9.3f}" for c in columns) + f" {wall:>8.0f}")


def new_figure(nrows=1, ncols=1, figsize=(6, 4), **subplot_kw):
    """A figure drawn straight to files: matplotlib's Figure, not pyplot, so no display
    backend is needed and nothing global changes (a notebook keeps its inline plots).
    Imported only when a figure is made. Returns (fig, axes) as plt.subplots does."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def colormap(name):
    from matplotlib import colormaps
    return colormaps[name]


def save_figure(fig, out, name, data):
    """Write out/name.png and out/name.json."""
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=120)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    print(f"wrote {out}/{name}.png, {name}.json")


def save_plots(results, ks, out):
    fig, axes = new_figure(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ["pass@1", f"pass@{max(ks)}"]):
        for method, r in results.items():
            ax.plot([c["rollouts"] for c in r["curve"]], [c[metric] for c in r["curve"]],
                    marker=".", label=method)
        ax.set(xlabel="rollouts consumed (steps x prompts x N)", ylabel=f"held-out {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    fig, ax = new_figure(figsize=(5.5, 4))
    for method, r in results.items():
        ax.plot(ks, [r["final"][f"pass@{k}"] for k in ks], marker="o", label=method)
    first = next(iter(results.values()))["curve"][0]
    ax.plot(ks, [first[f"pass@{k}"] for k in ks], "k--", marker=".", label="start")
    ax.set(xscale="log", xlabel="k", ylabel="held-out pass@k")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pass_at_k.png", dpi=120)


# ----------------------------------------------------------------------------------------
# 8. Experiments: each is one command (--experiment=NAME) that writes JSON and PNG to --out.

def build_model(args, task):
    """A freshly initialised transformer on the chosen device (TF32 and bf16 autocast on CUDA)."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and args.world > 1:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process
        torch.cuda.set_device(device)  # its streams (and CUDA graphs) on that GPU, not GPU 0
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    torch.manual_seed(args.seed)
    model_cfg = ModelConfig(len(task.vocab), task.prompt_len + task.max_completion_len,
                            args.n_layer, args.n_head, args.n_embd)
    model = Transformer(model_cfg).to(device)
    if args.compile:
        model.compile(dynamic=True)  # sequence lengths vary from call to call
    if args.cuda_graphs:
        model.cuda_graphs = CUDAGraphs(model)
    print(f"{args.task}: prompt {task.prompt_len} tokens, completion <= {task.max_completion_len}; "
          f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")
    return model, model_cfg, device


class CUDAGraphs:
    """--cuda-graphs: sampling's one-token step replayed from recorded CUDA graphs.

    At this size a GPU spends a decoding step launching ~100 tiny kernels from Python, not
    computing. A CUDA graph records one step's kernels once and replays them with one launch.
    A graph fixes every shape and address, so each (rows, prompt length, capacity) gets its
    own KV cache and input buffer, and within it one graph per position: the step at position
    P + t attends to the same P + t + 1 keys as the plain step, so a replay computes what
    model(token, cache) computes, bit for bit (a GPU test checks). Graphs read the weights
    where they live, and optimizers update them in place, so recordings stay valid. Each shape
    keeps its cache for the whole run: a few GB over --paper-size's sweep of N."""

    def __init__(self, model):
        self.model, self.pool = model, torch.cuda.graph_pool_handle()  # graphs share one pool
        self.buffers = {}  # (rows, P, capacity) -> cache, token buffer, {position: (graph, logits)}

    def decoder(self, prompt_kv, n, capacity):  # as one_token_decoder; one in use per shape
        rows, prompt_len = prompt_kv[0][0].shape[0] * n, prompt_kv[0][0].shape[2]
        key = (rows, prompt_len, capacity)
        if key in self.buffers:
            self.buffers[key][0].fill(prompt_kv, n)
        else:
            token = torch.zeros(rows, 1, dtype=torch.long, device=prompt_kv[0][0].device)
            self.buffers[key] = KVCache(prompt_kv, n, capacity), token, {}  # filled on creation
        cache, token_buffer, graphs = self.buffers[key]

        def step(token):  # (rows, 1) -> (rows, V), valid until the next step
            position = cache.length
            token_buffer.copy_(token)
            if position not in graphs:
                graphs[position] = self.record(cache, token_buffer)
            graph, logits = graphs[position]
            graph.replay()
            cache.length = position + 1
            return logits
        return step

    def record(self, cache, token_buffer):
        position, side = cache.length, torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one plain run first, as recording requires
            self.model(token_buffer, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        cache.length = position
        with torch.cuda.graph(graph, pool=self.pool):  # records; computes nothing
            logits = self.model(token_buffer, cache)[0][:, -1]  # (rows, V)
        cache.length = position
        return graph, logits


def flag_record(args):
    """The flags of a run, as written to its JSON."""
    return {k: v if isinstance(v, (int, float, str, list, type(None))) else str(v)
            for k, v in vars(args).items() if k not in ("task_obj", "out")}


def save_atomic(state, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def save_rank0(state, path, args):
    if args.rank == 0:
        save_atomic(state, path)


WARM_START_FLAGS = ("task", "size", "loops", "digits", "ops", "single_token", "train_pool", "eval_prompts",
                    "n_layer", "n_head", "n_embd", "sft_steps", "sft_batch", "sft_lr", "seed", "world",
                    "compile")


def warm_start_key(args, device):
    """A short hash of everything the warm-started weights depend on: the flags above
    (eval_prompts fixes the held-out split, which training never draws from), the device type,
    the torch version, and this code (an edited maxrl.py or toy_tasks.py never reuses old weights)."""
    code = b"".join(Path(path).read_bytes() for path in (__file__, toy_tasks.__file__))  # also under cProfile
    depends_on = {flag: getattr(args, flag) for flag in WARM_START_FLAGS}
    depends_on |= {"device": device.type, "torch": torch.__version__,
                   "code": hashlib.sha256(code).hexdigest()}
    return hashlib.sha256(json.dumps(depends_on, sort_keys=True).encode()).hexdigest()[:16]


def load_cached_weights(model, path):
    """Load path into model if it holds weights of exactly this model; a missing, partial or
    corrupt file returns False (and is then rebuilt), never an error."""
    try:
        state = torch.load(path, map_location=model.embed.weight.device, weights_only=True)
        expected = model.state_dict()
        if state.keys() != expected.keys() or any(state[k].shape != v.shape for k, v in expected.items()):
            return False
    except Exception:  # missing, truncated or not a state dict: recompute
        return False
    model.load_state_dict(state)
    return True


def shared_start(model, task, args, device, ks):
    """The warm start every method trains from, and its held-out metrics (pass@k for k in ks)."""
    started = time.time()
    warm_start(model, task, args, device)
    initial, per_prompt_p, _ = evaluate(model, task, ks, seed=args.seed + 1)
    return {"init_state": {k: v.clone() for k, v in model.state_dict().items()}, "initial": initial,
            "per_prompt_p": per_prompt_p, "warm_start_s": time.time() - started}


def compare_methods(args):
    """The main command: every method from the same warm start; table, results.json, plots.
    out/checkpoint.pt holds the run's state until it completes, for --resume."""
    task, ks, checkpoint_path = args.task_obj, eval_ks(args.N), args.out / "checkpoint.pt"
    model, model_cfg, device = build_model(args, task)
    if args.resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
    else:
        state = {"flags": resumable_flags(args), "shared": shared_start(model, task, args, device, ks),
                 "done": {}, "current": None}
        save_rank0(state, checkpoint_path, args)
    shared, results = state["shared"], state["done"]
    p = shared["per_prompt_p"]
    print(f"held-out pass rate after warm start: mean {p.mean():.3f}, quartiles "
          + " / ".join(f"{q:.3f}" for q in np.percentile(p, [25, 50, 75]))
          + f", {np.mean(p == 0):.0%} of prompts never solved")
    for method in [m for m in args.methods if m not in results]:
        resumed = state["current"] if state["current"] and state["current"]["method"] == method else None
        start = resumed["state"] if resumed else fresh_start(shared["init_state"], shared["initial"], args, device)
        save = lambda current: save_rank0({**state, "current": {"method": method, "state": current}},
                                          checkpoint_path, args)
        results[method] = train_method(method, model, task, args, device, start, ks, save)
        if results[method]["interrupted"]:
            break
        state["current"] = None
        save_rank0(state, checkpoint_path, args)
    if args.rank > 0:  # under torchrun only the first process reports and writes
        return model, None
    summary = write_results(args, model_cfg, device, shared, results, ks)
    if not summary["interrupted"]:
        checkpoint_path.unlink()
    return model, summary  # the model as the last method left it (notebook 03 samples from it)


def resumable_flags(args):
    """The flags a resumed run must share with the run it continues."""
    not_shared = ("resume", "overwrite", "ckpt_every", "cache_dir", "no_cache")
    return {k: v for k, v in flag_record(args).items() if k not in not_shared}


def write_results(args, model_cfg, device, shared, results, ks):
    """Print the table and failures; write results.json and the plots. Returns the summary."""
    print_table(shared["initial"], shared["warm_start_s"], results, ks)
    for method, r in results.items():
        for failure in r["failures"][:2]:
            print(f"  {method} failure: {failure}")
    config = flag_record(args) | {
        "model": asdict(model_cfg), "device": str(device),
        "pass@k_estimator": "exact, 1-(1-p)^k" if args.task_obj.unique_answers else f"unbiased, n={max(ks)}"}
    interrupted = len(results) < len(args.methods) or any(r["interrupted"] for r in results.values())
    summary = {"task": args.task, "N": args.N, "seed": args.seed, "config": config,
               "interrupted": interrupted, "initial": shared["initial"],
               "initial_pass_rate_quartiles": np.percentile(shared["per_prompt_p"], [25, 50, 75]).tolist(),
               "warm_start_wall_s": shared["warm_start_s"], "methods": results}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    save_plots(results, ks, args.out)
    print(f"wrote {args.out}/results.json, curves.png, pass_at_k.png"
          + (f" (interrupted: continue with --resume --out={args.out})" if interrupted else ""))
    return summary


def prompts_by_pass_rate(model, task, device):
    """Held-out prompts of a unique-answer task with their exact p, sorted by p."""
    rows = []
    for problem in task.test_problems:
        prompt = prompt_tensor(task, [problem], device)[0]
        answer = task.reference_completion(problem)
        with torch.no_grad():
            rows.append((target_pass_rate(model, prompt, answer).item(), prompt, answer))
    return sorted(rows, key=lambda row: row[0])


def prompts_spread_in_log_p(model, task, device, n_prompts):
    """Up to n_prompts held-out (p, prompt, answer), spread evenly in log p over those with
    p >= 0.01 (below that the Monte Carlo noise swamps a measurement)."""
    all_rows = prompts_by_pass_rate(model, task, device)
    rows = [row for row in all_rows if row[0] >= 0.01] or all_rows[-n_prompts:]  # tiny test runs
    log_p = np.log([row[0] for row in rows])
    chosen = {int(np.abs(log_p - x).argmin()) for x in np.linspace(log_p[0], log_p[-1], n_prompts)}
    return [rows[i] for i in sorted(chosen)]


def measure_weights(model, task, args, device, names, n_prompts=5):
    """w measured on the transformer: the averaged gradient's component along grad p over
    |grad p|^2, at n_prompts held-out prompts spread in log p. Returns {name: [(p, w, standard error)]}."""
    generator = torch.Generator(device).manual_seed(args.seed)
    measured = {name: [] for name in names}
    prompts = prompts_spread_in_log_p(model, task, device, n_prompts)
    for p, prompt, answer in tqdm(prompts, desc="measuring w"):
        batches = sampled_gradients(model, prompt, answer, args.N,
                                    {name: estimator_weighting(name) for name in names}, n_batches=10,
                                    groups=64, generator=generator, max_len=task.max_completion_len,
                                    stop_id=task.stop_id)
        grad_p = flat_grad(target_pass_rate(model, prompt, answer), model)
        for name, grads in batches.items():
            along = (grads @ grad_p / grad_p.square().sum()).cpu().numpy()  # (n_batches,)
            measured[name].append((p, float(along.mean()), float(along.std(ddof=1) / len(along) ** 0.5)))
    return measured


def weights_experiment(args):
    """The paper's weight-function figure: analytic w(p), weight() at finite N, and w measured on the model."""
    model, _, device = build_model(args, args.task_obj)
    warm_start(model, args.task_obj, args, device)
    names = ["rloo", "grpo", "maxrl"]
    measured = measure_weights(model, args.task_obj, args, device, names)
    p = np.logspace(-3, 0, 300)
    fig, ax = new_figure(figsize=(7, 5))
    ax.plot(p, np.ones_like(p), "k-", label="RL (pass@1): 1")
    ax.plot(p, 1 / np.sqrt(p * (1 - p) + 1e-12), "C1-", label="GRPO, N -> inf: 1/sqrt(p(1-p))")
    for i, T in enumerate([2, 4, 16, 64, 256]):
        ax.plot(p, (1 - (1 - p) ** T) / p, color=colormap("Blues")(0.35 + 0.13 * i), label=f"MaxRL T={T}")
    ax.plot(p, 1 / p, "k--", label="maximum likelihood: 1/p")
    N = args.N
    ax.plot(p, weight("grpo", p, N), "C1:", lw=2, label=f"weight('grpo', p, N={N})")
    ax.plot(p, weight("maxrl", p, N), "C3:", lw=2, label=f"weight('maxrl', p, N={N}): T=N-1")
    ax.plot(p, weight("maxrl_order_n", p, N), "C2:", lw=2, label=f"weight('maxrl_order_n', p, N={N}): T=N")
    for name, color in zip(names, ["k", "C1", "C3"]):
        ps, ws, errors = np.array(measured[name]).T
        ax.errorbar(ps, ws, yerr=2 * errors, fmt="o", color=color, mfc="white", capsize=3,
                    label=f"{name} measured on the transformer (N={N}, +-2 s.e.)")
    ax.set(xscale="log", yscale="log", xlabel="pass rate p", ylabel="weight w(p):  E[gradient] = w(p) grad p",
           ylim=(0.5, 2e3))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, args.out, "weights", {"N": N, "measured": measured})


def gradnorm_experiment(args, n_prompts=48, n_groups=8):
    """The paper's gradient-norm analysis: per-prompt gradient L2 norm against p on held-out
    prompts of the warm-started model. Filled markers: the expected gradient's norm, exactly
    w_N(p) |grad p| (ml: |grad log p|). Faint markers: one group's estimate, averaged over
    n_groups groups, which is what one update sees of that prompt."""
    task = args.task_obj
    model, _, device = build_model(args, task)
    warm_start(model, task, args, device)
    names, generator = ["rloo", "grpo", "maxrl"], torch.Generator(device).manual_seed(args.seed)
    rows = [row for row in prompts_by_pass_rate(model, task, device) if row[0] >= 1e-3]
    rows = [rows[i] for i in sorted(set(np.linspace(0, len(rows) - 1, n_prompts).round().astype(int)))]
    norms = {name: {"p": [], "expected": [], "sampled": []} for name in names}
    norms["ml"] = {"p": [], "expected": []}
    for p, prompt, answer in tqdm(rows, desc="gradient norms"):
        p_tensor = target_pass_rate(model, prompt, answer)
        grad_p_norm = flat_grad(p_tensor, model).norm().item()
        groups = sampled_gradients(model, prompt, answer, args.N,
                                   {name: estimator_weighting(name) for name in names}, n_batches=n_groups,
                                   groups=1, generator=generator, max_len=task.max_completion_len,
                                   stop_id=task.stop_id)
        for name in names:
            norms[name]["expected"].append(weight(name, p, args.N) * grad_p_norm)
            norms[name]["sampled"].append(groups[name].norm(dim=1).mean().item())
        norms["ml"]["expected"].append(grad_p_norm / p)  # exact: ml samples nothing
        for name in norms:
            norms[name]["p"].append(p)
    fig, ax = new_figure(figsize=(6.5, 4.5))
    for i, (name, values) in enumerate(norms.items()):
        ax.scatter(values["p"], values["expected"], color=f"C{i}", s=18, label=f"{name}: E[gradient]")
        if name != "ml":
            ax.scatter(values["p"], values["sampled"], color=f"C{i}", s=12, alpha=0.25, marker="^")
    ax.set(xscale="log", yscale="log", xlabel="held-out pass rate p (exact)",
           ylabel="per-prompt gradient L2 norm", title=f"triangles: one group of N={args.N}, averaged")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, args.out, "gradnorm", {"N": args.N, "norms": norms})


def maxrl_objective(p, T):
    """J_T(p) = -sum_{k=1..T} (1-p)^k / k, MaxRL's objective of order T (T -> inf: log p)."""
    return -sum((1 - p) ** k / k for k in range(1, T + 1))


def gradcos_experiment(args, names=("rloo", "grpo", "maxrl")):
    """Gradient-level interpolation: on one batch of held-out arith prompts of the warm-started
    model, the cosine between each estimator's batch gradient (one group of N per prompt) and
    the exact gradients of mean_x log p(x) (maximum likelihood) and of mean_x J_N(p(x)) (MaxRL
    of order N), as N grows; mean and range over --seeds sampling seeds."""
    task = args.task_obj
    model, _, device = build_model(args, task)
    warm_start(model, task, args, device)
    problems = task.test_problems[:args.batch]
    prompts = prompt_tensor(task, problems, device)  # (B, Tp)
    p = reference_logprob(model, task, problems, prompts).exp()  # (B,) exact, with grad
    ml_grad = flat_grad(p.log().mean(), model, retain_graph=True)
    cosines = {name: {"ml": [], "order_n": []} for name in names}  # [N index][seed]
    for N in tqdm(args.Ns, desc="N"):
        order_n_grad = flat_grad(maxrl_objective(p, N).mean(), model, retain_graph=True)
        for values in cosines.values():
            values["ml"].append([]), values["order_n"].append([])
        for seed in range(args.seeds):
            generator = torch.Generator(device).manual_seed(seed)
            completions, lengths = sample_completions(model, prompts, N, task.max_completion_len,
                                                      task.stop_id, generator)  # (B, N, Tc)
            rewards = score(task, problems, completions, lengths)  # (B, N)
            seq_logprob = completion_logprobs(model, prompts, completions, lengths)  # (B, N)
            for name in names:
                loss = policy_gradient_loss(seq_logprob, ESTIMATORS[name](rewards))
                grad = flat_grad(-loss, model, retain_graph=True)
                for target, exact in (("ml", ml_grad), ("order_n", order_n_grad)):
                    cosines[name][target][-1].append(F.cosine_similarity(grad, exact, dim=0).item())
    fig, axes = new_figure(1, 2, figsize=(10, 4), sharey=True)
    for ax, target, title in zip(axes, ["ml", "order_n"], ["exact maximum-likelihood gradient",
                                                           "exact order-N MaxRL gradient"]):
        for name in names:
            values = np.array(cosines[name][target])  # (len(Ns), seeds)
            mean = values.mean(1)
            ax.errorbar(args.Ns, mean, yerr=[mean - values.min(1), values.max(1) - mean],
                        marker="o", capsize=3, label=name)
        ax.set(xscale="log", xlabel="rollouts per prompt N", title=f"cosine to the {title}")
        ax.set_xticks(args.Ns, [str(N) for N in args.Ns])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"cosine ({len(problems)} prompts, mean and range over {args.seeds} seeds)")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, args.out, "gradcos", {"Ns": args.Ns, "p": p.tolist(), "cosines": cosines})


def variance_experiment(args, n_batches=32, groups=8):
    """Gradient variance at equal order T = --T: maxrl@T and maxrl_u@T from N = --N rollouts,
    maxrl_order_n from N = T and maxrl from N = T + 1 (all unbiased for J_T), and maxrl from N
    (order N - 1). On --batch held-out prompts of the warm-started arith model (spread in log
    p), one update's gradient g = mean_x g_x takes one group of N per prompt; its relative
    variance is E|g - E g|^2 / |E g|^2 = sum_x Var[g_x] / |sum_x w_N(p_x) grad p_x|^2, with
    Var[g_x] (summed over parameters) from n_batches batches of `groups` groups and the exact
    mean from weight(). Times N: the same at equal rollouts (variance goes as 1 / groups)."""
    task, N, T = args.task_obj, args.N, args.T
    rows = list(dict.fromkeys([(f"maxrl@{T}", N, T), (f"maxrl_u@{T}", N, T), ("maxrl_order_n", T, T),
                               ("maxrl", T + 1, T), ("maxrl", N, N - 1)]))  # (name, N, order)
    model, _, device = build_model(args, task)
    warm_start(model, task, args, device)
    generator = torch.Generator(device).manual_seed(args.seed)
    prompts = prompts_spread_in_log_p(model, task, device, args.batch)
    variance, mean_grad = dict.fromkeys(rows, 0.0), dict.fromkeys(rows, 0.0)
    for p, prompt, answer in tqdm(prompts, desc="gradient variance"):
        grad_p = flat_grad(target_pass_rate(model, prompt, answer), model)
        for size in sorted({row[1] for row in rows}):  # the rows with this N share rollouts
            weightings = {row: estimator_weighting(row[0]) for row in rows if row[1] == size}
            batches = sampled_gradients(model, prompt, answer, size, weightings, n_batches, groups,
                                        generator, task.max_completion_len, task.stop_id)
            for row, grads in batches.items():  # grads (n_batches, n_params), each a mean of `groups`
                variance[row] += groups * grads.var(0).sum().item()  # one group's estimate
                mean_grad[row] += weight(row[0], p, size) * grad_p  # exact E g_x
    table = [{"estimator": row[0], "N": row[1], "order": row[2],
              "relative_variance": variance[row] / mean_grad[row].square().sum().item()} for row in rows]
    print(f"relative variance of one update's gradient ({len(prompts)} prompts, one group each)\n"
          "| estimator | N | order T | relative variance | x N (equal rollouts) |\n|---|---|---|---|---|")
    for r in table:
        print(f"| {r['estimator']} | {r['N']} | {r['order']} | {r['relative_variance']:.3g} "
              f"| {r['relative_variance'] * r['N']:.3g} |")
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"config": flag_record(args), "p": [row[0] for row in prompts], "rows": table}
    (args.out / "variance.json").write_text(json.dumps(data, indent=1))
    print(f"wrote {args.out}/variance.json")


def with_flags(args, **changes):
    """A copy of the parsed flags with some changed (one run of a sweep)."""
    return argparse.Namespace(**{**vars(args), **changes})


def train_sweep(args, runs, ks):
    """Train each (method, N) in runs from one shared start per seed (seeds 0 .. --seeds-1),
    on the same prompt stream and steps: the engine of the interpolation, order and scaling
    experiments. Returns the start's metrics per seed and {label: [one result per seed]}."""
    task, initial, results = args.task_obj, [], {}
    for seed in range(args.seeds):
        seed_args = with_flags(args, seed=seed)
        model, _, device = build_model(seed_args, task)
        shared = shared_start(model, task, seed_args, device, ks)
        initial.append(shared["initial"])
        for method, N in runs:
            run_args = with_flags(seed_args, N=N)
            start = fresh_start(shared["init_state"], shared["initial"], run_args, device)
            result = train_method(method, model, task, run_args, device, start, ks)
            results.setdefault(run_label(method, N), []).append(result)
            if Stop.requested:  # Ctrl-C: keep what is done
                return initial, results
    return initial, results


def finish_sweep_figure(fig, axes, args, name, title, data):
    """Legend, a title that says what the bands are, then out/name.png and out/name.json."""
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} mean and range over {args.seeds} seeds", fontsize=10)
    fig.tight_layout()
    save_figure(fig, args.out, name, data)


def save_interrupted_sweep(out, name, data):
    """Ctrl-C during a sweep: keep the finished runs (and the one cut short) as JSON; no figure."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**data, "interrupted": True}, indent=1))
    print(f"interrupted: wrote the runs done so far to {out}/{name}.json")


def run_label(method, N):
    return "ml" if method == "ml" else f"{method} N={N}"


def band(ax, x, per_seed, **style):
    """Mean over seeds as a line, min..max over seeds as a shaded band. per_seed (seeds, len(x))."""
    per_seed = np.asarray(per_seed)
    line, = ax.plot(x, per_seed.mean(0), **style)
    ax.fill_between(x, per_seed.min(0), per_seed.max(0), color=line.get_color(), alpha=0.15, lw=0)


def curve_bands(ax, results, metric, styles):
    """A band per run of a sweep (styles {label: plot style}): held-out metric against steps."""
    for label, style in styles.items():
        steps = [c["step"] for c in results[label][0]["curve"]]
        band(ax, steps, [[c[metric] for c in r["curve"]] for r in results[label]], label=label, **style)
    ax.set(xlabel="gradient steps", ylabel=f"held-out {metric} (exact)", yscale="log")
    ax.grid(alpha=0.3, which="both")


def shade(i, n):
    """The i-th of n colours, light to dark along viridis: a family of runs ordered by N or T."""
    return colormap("viridis")(0.85 * i / max(n - 1, 1))


def interpolation_experiment(args):
    """The paper's classification figure at toy scale: ml (exact cross-entropy) and maxrl at
    every N in --Ns, rloo and grpo at the largest N, all from the same start (no warm start:
    p starts near 1/vocabulary) with the same prompts and steps. Held-out exact pass@1 and
    pass@k against gradient steps; mean and range over --seeds seeds."""
    largest, ks = max(args.Ns), eval_ks(64)
    runs = [("ml", largest)] + [("maxrl", N) for N in args.Ns] + [(m, largest) for m in ("rloo", "grpo")]
    initial, results = train_sweep(args, runs, ks)
    data = {"config": flag_record(args), "Ns": args.Ns, "ks": ks, "initial": initial, "runs": results}
    if Stop.requested:
        return save_interrupted_sweep(args.out, "interpolation", data)
    styles = {run_label(method, N): {"color": "k", "lw": 2} if method == "ml" else
              {"color": shade(args.Ns.index(N), len(args.Ns))} if method == "maxrl" else
              {"color": "C3" if method == "rloo" else "C1", "ls": "--"} for method, N in runs}
    fig, axes = new_figure(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ["pass@1", f"pass@{max(ks)}"]):
        curve_bands(ax, results, metric, styles)
    title = f"arith{' single-token' if args.single_token else ''}: {args.batch} prompts per step,"
    finish_sweep_figure(fig, axes, args, "interpolation", title, data)


def order_experiment(args):
    """At equal rollouts, does a higher order help; at equal order, do more rollouts help?
    On single-token arith from scratch (as interpolation): maxrl@T for each T in --Ts at
    N = --N (top row), and maxrl@T at T = --T for each N in --Ns (bottom row), beside ml, all
    from the same start with the same prompts and steps. Held-out exact pass@1 and pass@64
    against steps; mean and range over --seeds seeds."""
    ks = eval_ks(64)
    rows = {f"N = {args.N} rollouts, order T varies": [(f"maxrl@{T}", args.N) for T in args.Ts],
            f"order T = {args.T}, rollouts N vary": [(f"maxrl@{args.T}", N) for N in args.Ns]}
    runs = list(dict.fromkeys([("ml", args.N), *itertools.chain(*rows.values())]))  # a run in both: once
    initial, results = train_sweep(args, runs, ks)
    data = {"config": flag_record(args), "N": args.N, "Ts": args.Ts, "T": args.T, "Ns": args.Ns,
            "ks": ks, "initial": initial, "runs": results}
    if Stop.requested:
        return save_interrupted_sweep(args.out, "order", data)
    fig, axes = new_figure(2, 2, figsize=(11, 8))
    for row_axes, (title, row_runs) in zip(axes, rows.items()):
        styles = {"ml": {"color": "k", "lw": 2}} | {run_label(method, N): {"color": shade(i, len(row_runs))}
                                                    for i, (method, N) in enumerate(row_runs)}
        for ax, metric in zip(row_axes, ["pass@1", f"pass@{max(ks)}"]):
            curve_bands(ax, results, metric, styles)
            ax.set_title(title, fontsize=9)
    axes[1, 0].legend(fontsize=8)
    title = f"arith{' single-token' if args.single_token else ''}: {args.batch} prompts per step,"
    finish_sweep_figure(fig, axes[:, 0], args, "order", title, data)


def scaling_experiment(args):
    """The paper's maze scaling figure at toy scale: each method in --methods at each N in
    --Ns from the same warm start (the main command's, so its cache is shared), with the same
    prompts per step and steps; then -log pass@k on the held-out mazes (unbiased estimator
    from 64 samples) against N, for k in 1, 8, 64. Mean and range over --seeds seeds."""
    ks, shown = eval_ks(64), [1, 8, 64]
    runs = [(method, N) for method in args.methods for N in args.Ns]
    initial, results = train_sweep(args, runs, ks)
    data = {"config": flag_record(args), "Ns": args.Ns, "ks": ks, "initial": initial, "runs": results}
    if Stop.requested:
        return save_interrupted_sweep(args.out, "scaling", data)
    fig, axes = new_figure(1, len(shown), figsize=(12, 4))
    neg_log = lambda values: -np.log(np.maximum(values, 1e-4))  # nothing solved: drawn at 1e-4
    for ax, k in zip(axes, shown):
        ax.axhline(neg_log(np.mean([m[f"pass@{k}"] for m in initial])), color="k", ls=":",
                   label="after warm start")
        for method in args.methods:
            per_seed = [[r["final"][f"pass@{k}"] for r in results[run_label(method, N)]] for N in args.Ns]
            band(ax, args.Ns, neg_log(np.array(per_seed).T), marker="o", label=method)  # (seeds, Ns)
        ax.set(xscale="log", xlabel="rollouts per prompt N", title=f"-log pass@{k} (held out)")
        ax.set_xticks(args.Ns, [str(N) for N in args.Ns])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
    title = f"nav {args.size}x{args.size}: {args.steps} steps x {args.batch} prompts;"
    finish_sweep_figure(fig, axes, args, "scaling", title, data)


def median_seconds(fn, device, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def print_profile(name, fn, device, rows=12):
    """--bench --profile: one call of fn under torch.profiler; the operations that took longest."""
    with torch.profiler.profile() as profiler:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    print(f"\n{name}, one call:")
    sort_by = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=rows))


def benchmark(args, repeats=3):
    """--bench: the cached, shared-prefix paths against naive ones, in the same run. Sampling:
    KV cache with each prompt prefilled once vs recomputing every sequence at every step.
    Training step (forward + backward of the policy-gradient loss): shared-prefix vs
    full-sequence forward. The model is freshly initialised (no warm start; its completions
    are random, about 15 tokens on nav): this measures the cost of each path, not of a policy."""
    task = args.task_obj
    model, _, device = build_model(args, task)
    prompts = prompt_tensor(task, task.sample_train(args.batch, random.Random(args.seed)), device)

    def sample(use_cache):
        generator = torch.Generator(device).manual_seed(args.seed)
        return sample_completions(model, prompts, args.N, task.max_completion_len, task.stop_id,
                                  generator, use_cache=use_cache)

    completions, lengths = sample(True)  # (B, N, Tc), (B, N); also warms up
    rewards = torch.randint(0, 2, lengths.shape, device=device).float()  # (B, N)

    def train_step(logprob_fn):
        model.zero_grad(set_to_none=True)
        loss = policy_gradient_loss(logprob_fn(model, prompts, completions, lengths), maxrl(rewards))
        loss.backward()

    train_step(completion_logprobs)  # warm-up
    n_tokens = lengths.sum().item()
    paths = {"sampling, no cache": lambda: sample(False), "sampling, cached": lambda: sample(True),
             "train step, full sequences": lambda: train_step(full_sequence_logprobs),
             "train step, shared prefix": lambda: train_step(completion_logprobs)}
    seconds = {name: median_seconds(fn, device, repeats) for name, fn in paths.items()}
    if args.profile:
        for name, fn in paths.items():
            print_profile(name, fn, device)
    print(f"{args.batch} prompts x N={args.N} completions of {lengths.float().mean():.1f} tokens, "
          f"prompt {task.prompt_len} tokens; median of {repeats} repeats")
    for name, sec in seconds.items():
        print(f"  {name:<28} {sec * 1e3:9.1f} ms   {n_tokens / sec:12,.0f} completion tokens/s")
    sampling = seconds["sampling, no cache"] / seconds["sampling, cached"]
    training = seconds["train step, full sequences"] / seconds["train step, shared prefix"]
    print(f"bench: sampling {sampling:.1f}x, training {training:.1f}x")


# ----------------------------------------------------------------------------------------
# 9. Command line.

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" where the help says the default
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage dump or traceback
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def build_parser():
    parser = ArgumentParser(description="Train REINFORCE/RLOO, GRPO and MaxRL side by side.",
                            formatter_class=HelpFormatter, epilog=DEFAULTS_HELP)
    parser.add_argument("--experiment", default="compare", choices=list(EXPERIMENTS),
                        help="compare = train the methods side by side; the others make one figure "
                             "each (see the list below); bench times the fast paths against naive ones")
    parser.add_argument("--bench", action="store_const", dest="experiment", const="bench",
                        help="same as --experiment=bench")
    group = parser.add_argument_group("task")
    group.add_argument("--task", choices=["nav", "arith"],
                       help="toy task (default: nav to compare, arith for the figures, which need exact p)")
    group.add_argument("--size", type=int, default=9, help="nav: maze side, odd, 5..31 (paper: 17)")
    group.add_argument("--train-pool", type=int, default=0,
                       help="train on a fixed pool of this many prompts, epoch after epoch (the paper's "
                            "data-scarce regime); 0 = a fresh prompt every draw (infinite data)")
    group.add_argument("--loops", type=float, default=0.0,
                       help="nav: fraction of inner walls knocked out, for several shortest paths")
    group.add_argument("--digits", type=int, default=2, help="arith: longest operand, in digits")
    group.add_argument("--ops", default="+", help="arith: operations to draw from, e.g. '+-*'")
    group.add_argument("--single-token", action="store_true",
                       help="arith: the answer is one token, one per possible result (classification)")
    group = parser.add_argument_group("training")
    group.add_argument("--methods", default="rloo,grpo,maxrl",
                       help=f"comma-separated, from {', '.join(ESTIMATORS)}, ml (arith only) and "
                            + ", ".join(pattern for pattern, _ in FAMILIES.values()) + " (e.g. maxrl@4)")
    group.add_argument("--N", type=int, default=16, help="rollouts per prompt (group size)")
    group.add_argument("--steps", type=int, default=150, help="RL steps per method")
    group.add_argument("--batch", type=int, default=16, help="prompts per RL step")
    group.add_argument("--lr", type=float, default=1e-4, help="RL learning rate (AdamW)")
    group.add_argument("--sft-steps", type=int, default=300,
                       help="supervised warm-start steps, shared by all methods (0 = none)")
    group.add_argument("--sft-batch", type=int, default=64, help="warm-start batch size")
    group.add_argument("--sft-lr", type=float, default=1e-3, help="warm-start learning rate")
    group.add_argument("--seed", type=int, default=0, help="seeds weights, prompts and sampling")
    group.add_argument("--cache-dir", default=str(Path(__file__).parent / "runs" / "cache"),
                       help="where warm-started weights are kept, keyed by every flag they depend on")
    group.add_argument("--no-cache", action="store_true", help="always recompute the warm start")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto = cuda when available")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--cuda-graphs", action="store_true",
                       help="replay sampling's decoding steps from recorded CUDA graphs (GPU only)")
    group.add_argument("--profile", action="store_true",
                       help="with --bench: also print where each path's time goes (torch.profiler)")
    group = parser.add_argument_group("model")
    group.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    group.add_argument("--n-head", type=int, default=4, help="attention heads")
    group.add_argument("--n-embd", type=int, default=96, help="width (divisible by 2 x heads)")
    group = parser.add_argument_group("evaluation and output")
    group.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts")
    group.add_argument("--eval-every", type=int, default=50, help="evaluate every this many steps")
    group.add_argument("--out", help="output folder (default runs/<task>-N<N>, or runs/<experiment>)")
    group.add_argument("--overwrite", action="store_true", help="write into an --out that holds a run")
    group.add_argument("--resume", action="store_true",
                       help="compare: continue the interrupted run in --out, from its checkpoint")
    group.add_argument("--ckpt-every", type=int, default=25,
                       help="compare: checkpoint every this many steps (0 = only on Ctrl-C)")
    group = parser.add_argument_group("sweeps and orders (interpolation, scaling, gradcos, order, variance)")
    group.add_argument("--Ns", default="4,16,64,256", help="comma-separated rollouts per prompt to sweep")
    group.add_argument("--Ts", default="1,4,16,64,256", help="order: the orders T of maxrl@T to sweep at --N")
    group.add_argument("--T", type=int, default=4,
                       help="order: the order of maxrl@T at every --Ns; variance: the order compared")
    group.add_argument("--seeds", type=int, default=3, help="seeds 0..SEEDS-1, each from its own start")
    group.add_argument("--paper-size", action="store_true",
                       help="scaling: the paper's maze setting (17x17, 3M parameters, N up to 128; a GPU)")
    return parser


TASK_DEFAULTS = {"arith": {"sft_steps": 400, "steps": 100, "lr": 3e-4, "eval_every": 10}}  # where not nav's
EXPERIMENT_DEFAULTS = {  # where an experiment's defaults differ from compare's; explicit flags win
    "interpolation": {"sft_steps": 0, "steps": 500, "lr": 1e-3, "eval_every": 25, "Ns": "4,16,64,256,1024"},
    "order": {"single_token": True, "sft_steps": 0, "steps": 500, "lr": 1e-3, "eval_every": 25, "N": 256},
    "scaling": {"Ns": "4,16,64", "steps": 100, "batch": 4, "eval_every": 1000},
}
PAPER_SIZE = {"size": 17, "n_embd": 256, "sft_steps": 1500, "sft_lr": 5e-4, "sft_batch": 32, "lr": 1e-4,
              "Ns": "4,8,16,32,64,128", "steps": 200, "batch": 16, "eval_prompts": 128}
DEFAULTS_HELP = "defaults that differ from those above (nav, compare):\n" + "\n".join(
    f"  {name}: " + " ".join(f"--{key.replace('_', '-')}={value}" for key, value in flags.items())
    for name, flags in [("--task=arith", TASK_DEFAULTS["arith"]), *EXPERIMENT_DEFAULTS.items(),
                        ("scaling --paper-size", PAPER_SIZE)])


def parse_args(argv=None):
    """Parse and validate every flag before anything is built or written."""
    parser = build_parser()
    first_pass = parser.parse_known_args(argv)[0]
    parser.set_defaults(**TASK_DEFAULTS.get(default_task(first_pass), {}))
    parser.set_defaults(**EXPERIMENT_DEFAULTS.get(first_pass.experiment, {}))
    if first_pass.paper_size:
        parser.set_defaults(**PAPER_SIZE)
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.task = default_task(args)
    args.rank, args.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun
    for failed, message in flag_problems(args):
        if failed:
            parser.error(message)
    try:
        args.task_obj = make_task(args.task, n_test=args.eval_prompts, size=args.size,
                                  loops=args.loops, digits=args.digits, ops=args.ops,
                                  single_token=args.single_token, train_pool=args.train_pool)
    except ValueError as err:
        parser.error(str(err))
    args.Ns, args.Ts = sorted(set(int_list(args.Ns))), sorted(set(int_list(args.Ts)))
    default_out = f"runs/{args.task}-N{args.N}" if args.experiment == "compare" else f"runs/{args.experiment}"
    args.out = Path(args.out or default_out)
    checkpoint = args.out / "checkpoint.pt"
    if args.resume and not checkpoint.exists():
        parser.error(f"nothing to resume: {checkpoint} does not exist")
    if args.resume and torch.load(checkpoint, weights_only=False)["flags"] != resumable_flags(args):
        parser.error(f"--resume needs the same flags as the run in {args.out}")
    if (args.experiment != "bench" and not (args.resume or args.overwrite) and args.rank == 0
            and args.out.is_dir() and any(args.out.iterdir())):
        parser.error(f"{args.out} already holds a run: --resume continues it, --overwrite replaces it")
    return args


def int_list(text):
    """'4,16,64' -> [4, 16, 64]; [] if it is not a comma-separated list of integers."""
    return [int(x) for x in text.split(",")] if re.fullmatch(r"\d+(,\d+)*", text) else []


def default_task(args):
    """--task, or nav for the main command and arith for the experiments that need exact p."""
    return args.task or ("arith" if args.experiment in EXACT_P_EXPERIMENTS else "nav")


def flag_problems(args):
    """(is it wrong, what to say) for every check on the flags themselves."""
    Ns, Ts = int_list(args.Ns), int_list(args.Ts)
    problems = [
        (args.experiment in EXACT_P_EXPERIMENTS and args.task != "arith",
         f"--experiment={args.experiment} needs exact pass rates: use --task=arith"),
        (args.N < 1, f"--N must be >= 1 (got {args.N})"),
        (not Ns or min(Ns) < 1, f"--Ns must be comma-separated integers >= 1 (got {args.Ns!r})"),
        (not Ts or min(Ts) < 1, f"--Ts must be comma-separated integers >= 1 (got {args.Ts!r})"),
        (args.seeds < 1, f"--seeds must be >= 1 (got {args.seeds})"),
        (args.train_pool < 0, f"--train-pool must be >= 0 (got {args.train_pool})"),
        (args.ckpt_every < 0, f"--ckpt-every must be >= 0 (got {args.ckpt_every})"),
        (args.world > 1 and args.experiment != "compare", "torchrun runs the main command (compare) only"),
        (args.batch % args.world or args.sft_batch % args.world,
         f"--batch and --sft-batch must divide among the {args.world} processes"),
        (args.resume and args.overwrite, "--resume and --overwrite exclude each other"),
        (args.resume and args.experiment != "compare", "--resume continues the main command (compare) only"),
        (args.paper_size and args.experiment != "scaling", "--paper-size goes with --experiment=scaling"),
        (args.single_token and args.task != "arith", "--single-token is an arith option"),
        (not args.methods, "--methods is empty"),
        (len(set(args.methods)) < len(args.methods), "--methods lists a method twice"),
        (args.steps < 0 or args.sft_steps < 0, "--steps and --sft-steps must be >= 0"),
        (not (args.lr > 0 and args.sft_lr > 0), "learning rates must be > 0"),  # NaN too
        (min(args.batch, args.sft_batch, args.eval_prompts, args.eval_every) < 1,
         "--batch, --sft-batch, --eval-prompts and --eval-every must be >= 1"),
        (min(args.n_layer, args.n_head, args.n_embd) < 1 or args.n_embd % (2 * args.n_head),
         "--n-embd must be a positive multiple of 2 x --n-head"),
        (args.device == "cuda" and not torch.cuda.is_available(), "--device=cuda but no GPU is visible"),
        (args.cuda_graphs and (args.device == "cpu" or not torch.cuda.is_available()),
         "--cuda-graphs needs a CUDA GPU"),
        (args.cuda_graphs and args.compile, "--cuda-graphs and --compile are exclusive"),
        (args.profile and args.experiment != "bench", "--profile goes with --bench"),
        ("ml" in args.methods and args.task != "arith",
         "ml (exact cross-entropy) needs unique answers: use it with --task=arith"),
    ]
    if any(failed for failed, _ in problems):
        return problems  # the estimator checks below need valid group sizes
    group_size = min(Ns) if args.experiment in SWEEPS else args.N
    uses = [("--methods", method, group_size) for method in args.methods if method != "ml"]
    if args.experiment == "order":
        uses += [("--Ts", f"maxrl@{T}", args.N) for T in Ts] + [("--T", f"maxrl@{args.T}", group_size)]
    if args.experiment == "variance":
        uses += [("--T", f"maxrl@{args.T}", args.N)]
    for flag, name, N in uses:
        why = estimator_problem(name, N)
        problems.append((why is not None, f"{flag}: {why}"))
    return problems


EXPERIMENTS = {"compare": compare_methods, "weights": weights_experiment, "gradnorm": gradnorm_experiment,
               "gradcos": gradcos_experiment, "variance": variance_experiment,
               "interpolation": interpolation_experiment, "order": order_experiment,
               "scaling": scaling_experiment, "bench": benchmark}
EXACT_P_EXPERIMENTS = ("weights", "gradnorm", "gradcos", "variance", "interpolation", "order")  # exact p
SWEEPS = ("interpolation", "order", "scaling")  # train runs over --Ns with train_sweep


def main(argv=None):
    args = parse_args(argv)
    if args.world > 1:  # launched by torchrun: one process per GPU (nccl) or per CPU slot (gloo)
        dist.init_process_group("nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo")
    if args.experiment in ("compare", *SWEEPS):  # Ctrl-C: finish the step, save, exit 130
        signal.signal(signal.SIGINT, request_stop)
    EXPERIMENTS[args.experiment](args)
    if args.world > 1:
        dist.destroy_process_group()
    if Stop.requested:
        sys.exit(130)


if __name__ == "__main__":
    main()
