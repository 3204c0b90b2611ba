"""Maximum Likelihood Reinforcement Learning (MaxRL), a minimal reference implementation.

MaxRL (Tajwar et al. 2026, arXiv 2602.02710). For a prompt x with a binary reward, let
p = p_theta(x) be the probability that one sampled completion is correct. RL maximises p;
maximum likelihood would maximise log p = -sum_{k>=1} (1-p)^k / k, a series in the
(1-p)^k = 1 - pass@k of which RL keeps only the first. MaxRL keeps the first T terms, and its gradient is a
re-weighted policy gradient:

    J_T(x) = -sum_{k=1..T} (1-p)^k / k        grad J_T = w_T(p) grad p,   w_T(p) = (1-(1-p)^T) / p

T = 1 is RL (w = 1), T -> infinity is maximum likelihood (w = 1/p: hard prompts weigh more).

The algorithm is identical to RLOO / GRPO training (sample N completions per prompt, score
them 0/1, weight each completion's log-probability by an advantage) except:
  1. the advantage is A_j = (r_j - mean) / mean = N r_j / K - 1  (K = successes in the group):
     the policy-gradient sum is normalised by the number of successes K, not by N;
     GRPO divides by the standard deviation instead; RLOO subtracts the others' mean only;
  2. groups with no success (K = 0) contribute nothing (the paper's Algorithm 1), which makes
     the estimator exactly unbiased for J_T with T = N - 1; keeping the control variate -1 in
     all-fail groups (`maxrl_order_n`) gives order T = N (the paper's Theorem 2);
  3. nothing else: no KL, no clipping, no entropy bonus, fully on-policy.

How to read this file: the lesson runs from here to the end of the main command
(`compare_methods`), each part using only what stands above it: 1. the five estimators side
by side, the loss, pass@k and their exact weights; 2. the model; 3. sampling and log-probs;
4. evaluation; 5. training: the warm start, one RL step (`rl_loss`), the loop (`train_method`);
6. the main command. After it, under a banner: the order-T estimator families (maxrl@T,
maxrl_u@T, passk@k) and the command line (args, the parsed flags). The warm-start cache,
checkpoints, Ctrl-C and --resume, torchrun and the GPU options are in notebooks/plumbing.py;
the experiments and the benchmark in notebooks/experiments.py (python maxrl.py --experiment=X).
Run: python maxrl.py --task=nav --N=16 (rloo, grpo, maxrl side by side; --help for the rest).
"""

import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from toy_tasks import make_task

# ----------------------------------------------------------------------------------------
# 1. Estimators. Each maps binary rewards (..., N) of a group of N completions of one prompt
#    to advantages (..., N). The gradient estimate for the prompt is (1/N) sum_j A_j S_j with
#    S_j = grad log pi(z_j | x), the sum of the completion's token log-prob gradients.

ESTIMATORS = {}  # name -> advantage function


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


def policy_gradient_loss(seq_logprob, advantages):
    """-(1/N) sum_j A_j log pi(z_j|x), averaged over prompts. (B, N), (B, N) -> scalar.

    Sequence-level: seq_logprob sums the completion's token log-probs. A token-mean would
    weight long completions differently and is a different estimator. The value of this loss
    means nothing; watch the reward."""
    N = seq_logprob.shape[-1]
    return -(advantages.detach() * seq_logprob).sum(-1).div(N).mean()


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


def weight(name, p, N):
    """Exact weight w_N(p) of ESTIMATORS[name] at group size N (maxrl: w_{T=N-1} of the docstring).
    E[(1/N) sum_j A_j S_j] = w_N(p) grad p.

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
    completions; appending writes in place, so a decoding step never re-copies the past (only
    dropping ended rows, `keep`, copies what is left)."""

    def __init__(self, prompt_kv, n, capacity):
        B, H, _, D = prompt_kv[0][0].shape
        self.keys = [k.new_empty(B * n, H, capacity, D) for k, _ in prompt_kv]
        self.values = [v.new_empty(B * n, H, capacity, D) for _, v in prompt_kv]
        self.fill(prompt_kv, n)

    def fill(self, prompt_kv, n):  # (B, H, P, D) per layer -> the first P positions of each row
        for layer, (k, v) in enumerate(prompt_kv):
            B, H, P, D = k.shape
            self.keys[layer][:, :, :P].view(B, n, H, P, D)[:] = k[:, None]
            self.values[layer][:, :, :P].view(B, n, H, P, D)[:] = v[:, None]
        self.length = P  # tokens filled so far

    def keep(self, rows):  # (R,) bool: only these rows go on (the others' completions ended)
        self.keys, self.values = [k[rows] for k in self.keys], [v[rows] for v in self.values]

    def append(self, layer, k, v):  # (R, H, T, D) each -> all keys, values so far (R, H, P+T, D)
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

    def decoder(self, prompt_kv, n, capacity):
        """One decoding step: token (R, 1) -> logits (R, V) of the next token, extending a KV
        cache that starts as the prompts' keys/values, each shared by its n completions (R = B*n
        rows at first, fewer once rows leave); keep (R_before,) bool, if given, first drops the
        other rows from the cache."""
        cache = KVCache(prompt_kv, n, capacity)

        def step(token, keep=None):
            if keep is not None:
                cache.keep(keep)
            return self(token, cache)[0][:, -1]
        return step


def build_model(args, task):
    """A fresh transformer (seeded by --seed) on --device for a task (toy_tasks.py's interface)."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    model_cfg = ModelConfig(len(task.vocab), task.prompt_len + task.max_completion_len,
                            args.n_layer, args.n_head, args.n_embd)
    model = Transformer(model_cfg).to(device)
    print(f"{args.task}: prompt {task.prompt_len} tokens, completion <= {task.max_completion_len}; "
          f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")
    return model, model_cfg, device


# ----------------------------------------------------------------------------------------
# 3. Sampling and log-probs. Completions are (B, N, Tc) token ids with lengths (B, N): tokens
#    at positions >= length are padding (after the stop token or the token that decided the
#    reward, or never sampled).

def sample_token(logits, race):  # (R, V), (R, V) -> (R, 1)
    """torch.multinomial(logits.softmax(-1), 1) without its host sync. For one sample,
    multinomial checks p on the host (a GPU waits for that), then draws race = q ~ Exp(1) per
    token and takes argmax p / q (the exponential race, a form of the Gumbel-max trick). Given
    the same draws, same tokens (a test checks); we check p asynchronously instead."""
    probs = logits.softmax(-1)  # (R, V)
    torch._assert_async(probs.isfinite().all(), "sampling from non-finite logits: did training diverge?")
    return (probs / race).argmax(-1, keepdim=True)


@torch.no_grad()  # not inference_mode: the sampled tokens go on into the training forward
def sample_completions(model, prompts, n, max_len, stop_id, generator, decided=None, use_cache=True):
    """Sample n completions per prompt at temperature 1. prompts (B, Tp) -> (B, n, Tc), (B, n).

    A completion ends at the stop token, or once `decided` (the task's reward_decided) says its
    reward no longer depends on what would follow. The tokens after it are not sampled: they
    would change neither the reward nor the expected gradient (each token's score, grad log
    pi(z_t | z_<t), has mean zero given the tokens before it), so the estimator stays unbiased
    (its variance is lower, not its mean different).
    With use_cache, each prompt is run once and its keys/values are shared by its n
    completions; then one token per step. Without, the whole sequence is recomputed each step
    (slow; kept to test and benchmark the cache). Both draw the same random numbers."""
    B, device = prompts.shape[0], prompts.device
    rows = torch.arange(B * n, device=device)  # the completions still being sampled (R of them)
    sequences = prompts.repeat_interleave(n, 0)  # (R, Tp)
    if use_cache:
        logits, prompt_kv = model(prompts)
        logits = logits[:, -1].repeat_interleave(n, 0)  # (R, V)
        if max_len > 1:  # one token: no decoding
            decode = model.decoder(prompt_kv, n, capacity=prompts.shape[1] + max_len)
    # Asking which rows have ended makes the host wait for the GPU; on a GPU we ask every 8
    # tokens and keep computing ended rows (masked below). On a CPU asking is free: every
    # token, and ended rows leave the batch (and its KV cache, a copy), so the work shrinks.
    on_cpu = device.type == "cpu"
    tokens = torch.zeros(B * n, max_len, dtype=torch.long, device=device)  # <pad> is id 0 in every task
    lengths = torch.full((B * n,), max_len, device=device)
    ended = torch.zeros(B * n, dtype=torch.bool, device=device)  # (R,) by current row; tokens, lengths by original row
    for t in range(max_len):
        if not use_cache:
            logits = model(sequences)[0][:, -1]  # (R, V)
        race = torch.empty(B * n, logits.shape[-1], device=device).exponential_(generator=generator)
        next_token = sample_token(logits, race[rows])  # (R, 1): each row's own draw, whichever rows remain
        tokens[rows, t] = next_token[:, 0]
        ends_now = next_token[:, 0] == stop_id
        if decided is not None:
            ends_now |= decided(rows, next_token[:, 0])
        ends_now &= ~ended
        lengths[rows] = torch.where(ends_now, t + 1, lengths[rows])
        ended |= ends_now
        if t == max_len - 1 or ((on_cpu or t % 8 == 7) and ended.all()):
            break  # the last token needs no forward pass
        keep = ~ended if on_cpu and 4 * ended.sum() >= len(ended) else None  # once a quarter of the rows ended
        if keep is not None:
            rows, ended, next_token, sequences = rows[keep], ended[keep], next_token[keep], sequences[keep]
        if use_cache:
            logits = decode(next_token, keep)
        else:
            sequences = torch.cat([sequences, next_token], dim=1)
    completions = tokens[:, :t + 1]  # (B*n, Tc)
    completions[torch.arange(t + 1, device=device) >= lengths[:, None]] = 0  # after the end: <pad>
    return completions.view(B, n, -1), lengths.view(B, n)


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
    coverage is the fraction of prompts with at least one success among the n samples. Returns
    the metrics, p and the success count of each prompt (in the split's order), and a few failures."""
    n, device = max(ks), model.embed.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    successes, exact_p, failures = [], [], []
    for start in range(0, len(task.test_problems), batch):
        problems = task.test_problems[start:start + batch]
        prompts = prompt_tensor(task, problems, device)
        completions, lengths = sample_completions(model, prompts, n, task.max_completion_len, task.stop_id,
                                                  generator, task.reward_decided(problems, n, device))
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
    return metrics, p, c.astype(int).tolist(), failures[:n_failures]


# ----------------------------------------------------------------------------------------
# 5. Training: a supervised warm start shared by all methods, then each method from the same
#    weights, seed and prompt stream, with the same number of rollouts per step.

def supervised_loss(model, task, problems, device):
    """-mean log pi(reference | x): the warm start's loss, and exact maximum likelihood
    (method `ml`) where the reference is the unique correct answer."""
    return -reference_logprob(model, task, problems, prompt_tensor(task, problems, device)).mean()


def rl_loss(model, task, problems, method, N, generator, device):
    """One RL step's loss: sample N completions per prompt, score them, weight their log-probs."""
    prompts = prompt_tensor(task, problems, device)  # (B, Tp)
    completions, lengths = sample_completions(model, prompts, N, task.max_completion_len, task.stop_id, generator,
                                              task.reward_decided(problems, N, device))  # (B, N, Tc), (B, N)
    rewards = score(task, problems, completions, lengths)  # (B, N)
    advantages = ESTIMATORS[method](rewards)  # (B, N)
    signal = (advantages != 0).any(-1)  # (B,) groups with a non-zero gradient
    computed = signal.clone()  # the groups run through the model: those, or one if none has signal
    computed[0] |= ~signal.any()  # (its gradient is zero, but every parameter gets one: torchrun stays in step)
    seq_logprob = torch.zeros_like(advantages)  # (B, N); a zero-advantage group adds 0 whatever its log-probs
    seq_logprob[computed] = completion_logprobs(model, prompts[computed], completions[computed], lengths[computed])
    loss = policy_gradient_loss(seq_logprob, advantages)
    return loss, {"reward": rewards.mean().item(), "no_signal": 1 - signal.float().mean().item()}


def progress(iterable, args, **kwargs):
    """A progress bar on a terminal, on the first process only; none when output goes to a file."""
    return tqdm(iterable, disable=True if args.rank else None, **kwargs)


def warm_start(model, task, args, device):
    """Supervised fine-tuning on reference completions (BFS shortest paths, true answers), so RL
    starts from a non-zero pass rate. args.rank of args.world processes: 0 of 1 but under torchrun."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    rng = random.Random(f"sft-{args.seed}")
    for _ in progress(range(args.sft_steps), args, desc="warm start"):
        problems = task.sample_train(args.sft_batch, rng)[args.rank::args.world]  # this process's share
        loss = supervised_loss(model, task, problems, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


class Run:
    """Where the main command meets what lies beyond the lesson, in the plainest form: build the
    model, warm-start it, keep nothing; the command line's Ctrl-C handler sets stop_requested. Its
    subclass adds a warm-start cache, checkpoints (Ctrl-C, --resume), torchrun and GPU options."""
    stop_requested = False

    def __init__(self, args): self.args = args
    def model(self, task): return build_model(self.args, task)
    def warm_start(self, model, task, device): warm_start(model, task, self.args, device)
    def stop(self, device): return Run.stop_requested  # stop after this step?
    def saved(self, device): return None  # the state of an interrupted run to continue from
    def save(self, state): pass  # the run's state: its warm start, the methods done, the current one
    def save_progress(self, method, state): pass  # the current method's whole training state
    def finish(self, summary): pass  # the run is over and reported


def fresh_start(shared, args, device):
    """A method's training state at step 0 (a sampling stream per process); save_progress: later steps."""
    return {"step": 0, "model": shared["init_state"], "optimizer": None, "wall_s": 0.0,
            "prompt_rng": random.Random(f"prompts-{args.seed}").getstate(),  # same prompts for every method
            "generator": torch.Generator(device).manual_seed(args.seed + 1_000_003 * args.rank).get_state(),
            "curve": [{"step": 0, "rollouts": 0, **shared["initial"]}], "window": [], "failures": [], "successes": []}


def restore(start, model, args, device):
    """A training state (fresh_start's, or saved progress) into model, optimizer and random streams."""
    model.load_state_dict(start["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if start["optimizer"] is not None:
        optimizer.load_state_dict(start["optimizer"])
    prompt_rng, generator = random.Random(), torch.Generator(device)
    prompt_rng.setstate(start["prompt_rng"])
    generator.set_state(start["generator"])
    return optimizer, prompt_rng, generator


def train_method(method, model, task, args, device, start, ks, run):
    """Train one method from `start` to --steps: one on-policy update per step on --batch fresh
    prompts (`ml`: one cross-entropy step), held-out pass@k every --eval-every steps. Returns
    the curve, the final metrics and the wall time."""
    started = time.time() - start["wall_s"]
    optimizer, prompt_rng, generator = restore(start, model, args, device)
    curve, window, step = start["curve"], start["window"], start["step"]
    failures, successes = start["failures"], start["successes"]  # of the latest evaluation
    label = f"{method:>5} N={args.N:<4} seed {args.seed}"
    bar = progress(range(step + 1, args.steps + 1), args, initial=step, total=args.steps, desc=label)
    for step in bar:
        problems = task.sample_train(args.batch, prompt_rng)[args.rank::args.world]  # this process's share
        loss, stats = ((supervised_loss(model, task, problems, device), {}) if method == "ml"
                       else rl_loss(model, task, problems, method, args.N, generator, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()  # no clipping
        optimizer.step()
        window.append(stats)
        if step % args.eval_every == 0 or step == args.steps:
            metrics, _, successes, failures = evaluate(model, task, ks, seed=args.seed + 1)
            train_stats = {f"train_{key}": float(np.mean([s[key] for s in window])) for key in window[0]}
            curve.append({"step": step, "rollouts": step * args.batch * args.N, **metrics, **train_stats})
            window = []
            if bar.disable and args.rank == 0:  # no bar (output to a file): a line per evaluation
                print(f"{label}: step {step}/{args.steps} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        stop = run.stop(device)
        if stop or (args.ckpt_every and step % args.ckpt_every == 0):
            run.save_progress(method, {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "prompt_rng": prompt_rng.getstate(), "generator": generator.get_state(),
                                       "curve": curve, "window": window, "failures": failures,
                                       "successes": successes, "wall_s": time.time() - started})
        bar.set_postfix(reward=stats.get("reward", float("nan")), test_pass1=curve[-1]["pass@1"])
        if stop:
            break
    if step < args.steps and curve[-1]["step"] != step:  # stopped early: report the weights it stopped with
        metrics, _, successes, failures = evaluate(model, task, ks, seed=args.seed + 1)
        curve = curve + [{"step": step, "rollouts": step * args.batch * args.N, **metrics}]
    return {"final": curve[-1], "curve": curve, "wall_s": time.time() - started, "failures": failures,
            "per_prompt_successes": successes, "interrupted": step < args.steps}


# ----------------------------------------------------------------------------------------
# 6. The main command: one warm start, every method from it; the table, results.json, plots.

def shared_start(model, task, args, device, ks, run):
    """The warm start every method trains from, and its held-out metrics (pass@k for k in ks)."""
    started = time.time()
    run.warm_start(model, task, device)
    initial, per_prompt_p, successes, _ = evaluate(model, task, ks, seed=args.seed + 1)
    return {"init_state": {k: v.clone() for k, v in model.state_dict().items()}, "initial": initial,
            "per_prompt_p": per_prompt_p, "successes": successes, "warm_start_s": time.time() - started}


def print_table(initial, warm_start_s, results, ks):
    """Held-out metrics after the warm start ("start") and after each method's training."""
    columns = [f"pass@{k}" for k in ks] + ["coverage"]
    print(f"\n{'method':>13} " + " ".join(f"{c:>9}" for c in columns) + f" {'wall s':>8}")
    rows = [("start", initial, warm_start_s)] + [(m, r["final"], r["wall_s"]) for m, r in results.items()]
    for name, metrics, wall in rows:
        print(f"{name:>13} " + " ".join(f"{metrics[c]:>9.3f}" for c in columns) + f" {wall:>8.0f}")


def flag_record(args):
    """The flags of a run, as written to its JSON."""
    return {k: v if isinstance(v, (int, float, str, list, type(None))) else str(v)
            for k, v in vars(args).items() if k not in ("task_obj", "out")}


def new_figure(nrows=1, ncols=1, figsize=(6, 4), **subplot_kw):
    """(fig, axes) as plt.subplots, drawn straight to files: matplotlib's Figure, not pyplot,
    so no display backend is needed and nothing global changes (a notebook keeps its plots)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def save_plots(results, ks, out):
    """curves.png: held-out pass@1 and pass@max(k) against rollouts; pass_at_k.png: the end."""
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
               "initial_per_prompt_successes": shared["successes"], "samples_per_prompt": max(ks),
               "warm_start_wall_s": shared["warm_start_s"], "methods": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    save_plots(results, ks, args.out)
    print(f"wrote {args.out}/results.json, curves.png, pass_at_k.png"
          + (f" (interrupted: continue with --resume --out={args.out})" if interrupted else ""))
    return summary


def compare_methods(args, run=None):
    """The main command (python maxrl.py --task=nav --N=16): one warm start, then each of --methods
    from it with the same prompts, seed and rollouts per step; the table, and results.json and
    plots in --out. Returns the model as the last method left it, and the summary."""
    run, task, ks = run or Run(args), args.task_obj, eval_ks(args.N)
    model, model_cfg, device = run.model(task)
    state = run.saved(device) or dict(shared=shared_start(model, task, args, device, ks, run), done={}, current=None)
    run.save(state)
    shared, results = state["shared"], state["done"]
    p = shared["per_prompt_p"]
    print(f"held-out pass rate after warm start: mean {p.mean():.3f}, quartiles "
          + " / ".join(f"{q:.3f}" for q in np.percentile(p, [25, 50, 75]))
          + f", {np.mean(p == 0):.0%} of prompts never solved")
    for method in [m for m in args.methods if m not in results]:
        current = state["current"]
        resumed = current["state"] if current and current["method"] == method else None
        results[method] = train_method(method, model, task, args, device,
                                       resumed or fresh_start(shared, args, device), ks, run)
        if results[method]["interrupted"]:
            break
        state["current"] = None
        run.save(state)
    if args.rank > 0:  # under torchrun only the first process reports
        return model, None
    summary = write_results(args, model_cfg, device, shared, results, ks)
    run.finish(summary)
    return model, summary


# ========================================================================================
# End of the lesson; a reader may stop here. What follows: 7. the estimator families (any
# order T <= N, and pass@k) and 8. the command line. What keeps runs' work (the warm-start
# cache, checkpoints, Ctrl-C and --resume, torchrun, the GPU options) is notebooks/plumbing.py;
# the paper's experiments and the benchmark are notebooks/experiments.py.
# ========================================================================================

import argparse
import importlib
import signal

import torch.distributed as dist

# ----------------------------------------------------------------------------------------
# 7. The estimator families. From the same N rollouts one can estimate the order-T objective
#    J_T for any T <= N, and the gradient of pass@k for any k <= N: so "more rollouts" (lower
#    variance) and "higher order" can be told apart. With K successes and F = N - K failures
#    in the group, and C(a, b) the binomial coefficient (0 if b > a):
#      passk@k    success: k                       failure: k [1 - C(F-1, k-1) / C(N-1, k-1)]
#      maxrl_u@T  success: 1                       failure: -sum_{m=1..T-1} C(F-1, m) / C(N-1, m)
#      maxrl@T    success: (N / K) pass@T-hat - 1   failure: -1
#    passk@k is unbiased for grad pass@k; maxrl_u@T (a U-statistic) and maxrl@T (the paper's 1/K
#    estimator averaged over all T-subsets) for grad J_T; maxrl@N is maxrl_order_n. Each depends
#    on (r_j, K) only: a table over K = 0..N (float64, product form), looked up per group.

FAMILIES = {}  # family name -> (pattern, advantage_fn(rewards, order))


def family(pattern):
    """Register advantage_fn(rewards, order) as the family PATTERN = 'name@T' (looked up as name@4)."""

    def register(advantage_fn):
        FAMILIES[pattern.partition("@")[0]] = (pattern, advantage_fn)
        return advantage_fn
    return register


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


class Estimators(dict):
    """name -> advantage function: the five fixed estimators are stored (iterating gives them),
    a family member (maxrl@4, passk@16) is built on each lookup by family_member."""

    def __missing__(self, name):
        return family_member(name)


ESTIMATORS = Estimators(ESTIMATORS)  # from here on, ESTIMATORS["maxrl@4"] works too


def estimator_problem(name, N):
    """Why ESTIMATORS[name] cannot take groups of N rewards (the message), or None if it can."""
    try:
        ESTIMATORS[name](torch.zeros(N))
    except ValueError as err:
        return str(err)


# ----------------------------------------------------------------------------------------
# 8. Command line. Every check runs here, before anything is built or written; bad input is
#    one line on stderr and exit code 2.

EXPERIMENTS = ("compare", "weights", "gradnorm", "gradcos", "variance", "interpolation", "order", "scaling",
               "bench")  # all but compare are in notebooks/experiments.py
EXACT_P_EXPERIMENTS = ("weights", "gradnorm", "gradcos", "variance", "interpolation", "order")  # need arith
SWEEPS = ("interpolation", "order", "scaling")  # train runs over --Ns
TASK_DEFAULTS = {"arith": {"sft_steps": 400, "sft_batch": 64, "sft_lr": 1e-3, "steps": 100, "lr": 3e-4,
                           "eval_prompts": 128, "eval_every": 10}}  # where not nav's
EXPERIMENT_DEFAULTS = {  # where an experiment's defaults differ from compare's; explicit flags win
    "interpolation": {"sft_steps": 0, "steps": 500, "lr": 1e-3, "eval_every": 25, "Ns": "4,16,64,256,1024"},
    "order": {"single_token": True, "sft_steps": 0, "steps": 500, "lr": 1e-3, "eval_every": 25, "N": 256},
    "scaling": {"Ns": "4,16,64", "steps": 100, "batch": 4, "eval_every": 1000},
}
PAPER_SIZE = {"size": 17, "max_moves": 0, "n_embd": 256, "sft_steps": 1500, "sft_lr": 5e-4, "sft_batch": 32, "lr": 1e-4,
              "Ns": "4,8,16,32,64,128", "steps": 200, "batch": 16, "eval_prompts": 128}
DEFAULTS_HELP = "defaults that differ from those above (nav, compare):\n" + "\n".join(
    f"  {name}: " + " ".join(f"--{key.replace('_', '-')}={value}" for key, value in flags.items())
    for name, flags in [("--task=arith", TASK_DEFAULTS["arith"]), *EXPERIMENT_DEFAULTS.items(),
                        ("scaling --paper-size", PAPER_SIZE)])


def flag_type(convert, ok, wanted):
    """An argparse type: convert(text), refused with 'must be WANTED' unless ok(value)."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {wanted} (got {text!r})")
        return value
    return parse


POSITIVE = flag_type(int, lambda x: x >= 1, "an integer >= 1")
NATURAL = flag_type(int, lambda x: x >= 0, "an integer >= 0")
RATE = flag_type(float, lambda x: x > 0, "a number > 0")  # NaN too
INTEGERS = flag_type(lambda text: sorted({int(x) for x in text.split(",")}), lambda xs: min(xs) >= 1,
                     "comma-separated integers >= 1")
METHODS = flag_type(lambda text: [m.strip() for m in text.split(",") if m.strip()],
                    lambda ms: ms and len(set(ms)) == len(ms), "a comma-separated list of distinct methods")


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
    parser.add_argument("--experiment", default="compare", choices=EXPERIMENTS,
                        help="compare = train the methods side by side; the others make one figure "
                             "each (notebooks/experiments.py); bench times the fast paths against naive ones")
    parser.add_argument("--bench", action="store_const", dest="experiment", const="bench",
                        help="same as --experiment=bench")
    group = parser.add_argument_group("task")
    group.add_argument("--task", choices=["nav", "arith"],
                       help="toy task (default: nav to compare, arith for the figures, which need exact p)")
    group.add_argument("--size", type=int, default=9, help="nav: maze side, odd, 5..31 (paper: 17)")
    group.add_argument("--train-pool", type=NATURAL, default=0,
                       help="train on a fixed pool of this many prompts, sampled with replacement (the "
                            "paper's data-scarce regime); 0 = a fresh prompt every draw (infinite data)")
    group.add_argument("--max-moves", type=NATURAL, default=6,
                       help="nav: the goal at a shortest-path distance uniform in 1..MAX_MOVES, so pass "
                            "rates spread from easy to hard mazes (0 = any open square)")
    group.add_argument("--loops", type=float, default=0.0,
                       help="nav: fraction of inner walls knocked out, for several shortest paths")
    group.add_argument("--digits", type=int, default=2, help="arith: longest operand, in digits")
    group.add_argument("--ops", default="+", help="arith: operations to draw from, e.g. '+-*'")
    group.add_argument("--single-token", action="store_true",
                       help="arith: the answer is one token, one per possible result (classification)")
    add_training_flags(parser.add_argument_group("training"))
    add_output_flags(parser)
    return parser


def add_training_flags(group):
    group.add_argument("--methods", type=METHODS, default="rloo,grpo,maxrl",
                       help=f"comma-separated, from {', '.join(ESTIMATORS)}, ml (arith only) and "
                            + ", ".join(pattern for pattern, _ in FAMILIES.values()) + " (e.g. maxrl@4)")
    group.add_argument("--N", type=POSITIVE, default=16, help="rollouts per prompt (group size)")
    group.add_argument("--steps", type=NATURAL, default=150, help="RL steps per method")
    group.add_argument("--batch", type=POSITIVE, default=16, help="prompts per RL step")
    group.add_argument("--lr", type=RATE, default=1e-4, help="RL learning rate (AdamW)")
    group.add_argument("--sft-steps", type=NATURAL, default=500,
                       help="supervised warm-start steps, shared by all methods (0 = none)")
    group.add_argument("--sft-batch", type=POSITIVE, default=32, help="warm-start batch size")
    group.add_argument("--sft-lr", type=RATE, default=3e-3, help="warm-start learning rate")
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


def add_output_flags(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--n-layer", type=POSITIVE, default=4, help="transformer blocks")
    group.add_argument("--n-head", type=POSITIVE, default=4, help="attention heads")
    group.add_argument("--n-embd", type=POSITIVE, default=96, help="width (divisible by 2 x heads)")
    group = parser.add_argument_group("evaluation and output")
    group.add_argument("--eval-prompts", type=POSITIVE, default=256, help="held-out prompts")
    group.add_argument("--eval-every", type=POSITIVE, default=50, help="evaluate every this many steps")
    group.add_argument("--out", help="output folder (default runs/<task>-N<N>, or runs/<experiment>)")
    group.add_argument("--overwrite", action="store_true", help="write into an --out that holds a run")
    group.add_argument("--resume", action="store_true",
                       help="compare: continue the interrupted run in --out, from its checkpoint")
    group.add_argument("--ckpt-every", type=NATURAL, default=25,
                       help="compare: checkpoint every this many steps (0 = only on Ctrl-C)")
    group = parser.add_argument_group("sweeps and orders (interpolation, scaling, gradcos, order, variance)")
    group.add_argument("--Ns", type=INTEGERS, default="4,16,64,256", help="rollouts per prompt to sweep, e.g. 4,16")
    group.add_argument("--Ts", type=INTEGERS, default="1,4,16,64,256",
                       help="order: the orders T of maxrl@T to sweep at --N")
    group.add_argument("--T", type=POSITIVE, default=4,
                       help="order: the order of maxrl@T at every --Ns; variance: the order compared")
    group.add_argument("--seeds", type=POSITIVE, default=3, help="seeds 0..SEEDS-1, each from its own start")
    group.add_argument("--paper-size", action="store_true",
                       help="scaling: the paper's maze setting (17x17, 3M parameters, N up to 128; a GPU)")


def resumable_flags(args):
    """The flags a resumed run must share with the run it continues."""
    not_shared = ("resume", "overwrite", "ckpt_every", "cache_dir", "no_cache")
    return {k: v for k, v in flag_record(args).items() if k not in not_shared}


def default_task(args):
    """--task, or nav for the main command and arith for the experiments that need exact p."""
    return args.task or ("arith" if args.experiment in EXACT_P_EXPERIMENTS else "nav")


def flag_problems(args):
    """(is it wrong, what to say) for every check that involves more than one flag."""
    problems = [
        (args.experiment in EXACT_P_EXPERIMENTS and args.task != "arith",
         f"--experiment={args.experiment} needs exact pass rates: use --task=arith"),
        (args.world > 1 and args.experiment != "compare", "torchrun runs the main command (compare) only"),
        (args.batch % args.world or args.sft_batch % args.world,
         f"--batch and --sft-batch must divide among the {args.world} processes"),
        (args.resume and args.overwrite, "--resume and --overwrite exclude each other"),
        (args.resume and args.experiment != "compare", "--resume continues the main command (compare) only"),
        (args.paper_size and args.experiment != "scaling", "--paper-size goes with --experiment=scaling"),
        (args.single_token and args.task != "arith", "--single-token is an arith option"),
        (args.n_embd % (2 * args.n_head), "--n-embd must be a multiple of 2 x --n-head"),
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
    group_size = min(args.Ns) if args.experiment in SWEEPS else args.N
    uses = [("--methods", method, group_size) for method in args.methods if method != "ml"]
    if args.experiment == "order":
        uses += [("--Ts", f"maxrl@{T}", args.N) for T in args.Ts] + [("--T", f"maxrl@{args.T}", group_size)]
    if args.experiment == "variance":
        uses += [("--T", f"maxrl@{args.T}", args.N)]
    checks = [(flag, estimator_problem(name, N)) for flag, name, N in uses]
    return [(why is not None, f"{flag}: {why}") for flag, why in checks]


def parse_args(argv=None):
    """Parse and check every flag before anything is built or written."""
    parser = build_parser()
    first_pass = parser.parse_known_args(argv)[0]
    parser.set_defaults(**TASK_DEFAULTS.get(default_task(first_pass), {}))
    parser.set_defaults(**EXPERIMENT_DEFAULTS.get(first_pass.experiment, {}))
    if first_pass.paper_size:
        parser.set_defaults(**PAPER_SIZE)
    args = parser.parse_args(argv)
    args.task = default_task(args)
    args.rank, args.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun
    for failed, message in flag_problems(args):
        if failed:
            parser.error(message)
    try:
        args.task_obj = make_task(args.task, n_test=args.eval_prompts, size=args.size,
                                  loops=args.loops, digits=args.digits, ops=args.ops,
                                  single_token=args.single_token, train_pool=args.train_pool, max_moves=args.max_moves)
    except ValueError as err:
        parser.error(str(err))
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


def companion(name):
    """A module of notebooks/ (plumbing, experiments), which sit beside the lesson."""
    folder = str(Path(__file__).parent / "notebooks")
    if folder not in sys.path:
        sys.path.append(folder)
    return importlib.import_module(name)


def main(argv=None):
    args = parse_args(argv)
    plumbing = companion("plumbing")
    if args.world > 1:  # launched by torchrun: one process per GPU (nccl) or per CPU slot (gloo)
        dist.init_process_group("nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo")
    if args.experiment in ("compare", *SWEEPS):  # Ctrl-C: finish the step, save, exit 130
        signal.signal(signal.SIGINT, plumbing.request_stop)
    if args.experiment == "compare":
        compare_methods(args, plumbing.CommandLineRun(args, checkpoints=True))
    else:
        companion("experiments").EXPERIMENTS[args.experiment](args)
    if args.world > 1:
        dist.destroy_process_group()
    if Run.stop_requested:
        sys.exit(130)


if __name__ == "__main__":  # run as the module `maxrl`, which notebooks/ imports too: one copy of its state
    importlib.import_module("maxrl").main()
