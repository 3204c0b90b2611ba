"""Maximum Likelihood Reinforcement Learning (MaxRL), a minimal reference implementation.

MaxRL (Tajwar et al. 2026, arXiv 2602.02710). For a prompt x with a binary reward, let
p = p_theta(x) be the probability that one sampled completion is correct. RL maximises p;
maximum likelihood would maximise log p = -sum_{k>=1} (1-p)^k / k, a series in the
(1-p)^k = 1 - pass@k of which RL keeps only the first. MaxRL keeps the first T terms, and its
gradient is a re-weighted policy gradient:

    J_T(x) = -sum_{k=1..T} (1-p)^k / k        grad J_T = w_T(p) grad p,   w_T(p) = (1-(1-p)^T) / p

T = 1 is RL (w = 1), T -> infinity is maximum likelihood (w = 1/p: hard prompts weigh more).

The algorithm is identical to RLOO / GRPO training (sample N completions per prompt, score
them 0/1, weight each completion's log-probability by an advantage) except:
  1. the advantage is A_j = (r_j - mean) / mean = N r_j / K - 1  (K = successes in the group):
     the policy-gradient sum is normalised by the number of successes K, not by N;
     GRPO divides by the standard deviation instead; RLOO subtracts the others' mean only;
  2. as in RLOO and GRPO, groups with no success (K = 0) contribute nothing (Algorithm 1): this
     makes MaxRL's estimator exactly unbiased for grad J_T with T = N - 1; keeping the control
     variate -1 in all-fail groups (`maxrl_order_n`) gives order T = N (the paper's Theorem 2);
  3. nothing else: no KL, no clipping, no entropy bonus, fully on-policy.

How to read this file: the lesson runs from here to the end of the main command (`compare_methods`), each
part using only what stands above it: 1. the five estimators, the loss, pass@k, their exact weights; 2. the
model; 3. sampling and log-probs; 4. evaluation; 5. training: the warm start, one RL step (`rl_loss`), the loop
(`train_method`); 6. the main command and its report. After it: the order-T estimator families. notebooks/ holds
the command line, what keeps runs with the faster caches and decoders (plumbing.py), and the experiments.
Run: python maxrl.py --task=nav --N=16 (--help for the rest); --task=arith --methods=ml is exact cross-entropy.
"""

import functools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; else 0 of 1

# ----------------------------------------------------------------------------------------
# 1. Estimators. Each maps binary rewards (..., N) of a group of N completions of one prompt
#    to advantages (..., N). The gradient estimate for the prompt is (1/N) sum_j A_j S_j with
#    S_j = grad log pi(z_j | x), the sum of the completion's token log-prob gradients.

ESTIMATORS = {}  # name -> advantage function (after the lesson, also the order-T families: maxrl@4, ...)


def binary_only(advantage_fn):
    """The advantage function, refusing non-binary rewards (MaxRL divides by the mean)."""
    @functools.wraps(advantage_fn)
    def checked(rewards, *args, **kwargs):
        if not ((rewards == 0) | (rewards == 1)).all():
            raise ValueError("rewards must be binary (0 or 1): the estimators here assume 0/1 rewards")
        return advantage_fn(rewards, *args, **kwargs)
    return checked


def estimator(advantage_fn):  # registers an advantage function under its name
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
    return (rewards - mean) / torch.where(mean > 0, mean, 1.0)  # unbiased for grad J_T, T = N - 1


@estimator
def maxrl_order_n(rewards):  # Theorem 2: as maxrl, but A_j = -1 in all-fail groups (K = 0)
    all_fail = rewards.sum(-1, keepdim=True) == 0  # (..., 1)
    return maxrl(rewards) - all_fail.to(rewards.dtype)  # unbiased for grad J_T, T = N


def policy_gradient_loss(seq_logprob, advantages):
    """-(1/N) sum_j A_j log pi(z_j|x), averaged over prompts. (B, N), (B, N) -> scalar. Sequence-level:
    seq_logprob sums the completion's token log-probs (a token mean would weight long completions
    differently: another estimator). The value of this loss means nothing; watch the reward."""
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
    k = torch.arange(N, dtype=torch.float64)  # successes among the other N - 1 completions; also positions
    group_with_success = (k <= k[:, None]).double()  # (N, N) row k: k+1 successes, the first one is one
    group_with_failure = (k < k[:, None]).double()  # (N, N) row k: k successes, the last one is zero
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


def apply_rotary(x, cos, sin):  # x (B, H, T, D); cos, sin (T, D/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of the tokens so far, per layer, for R = B*n rows (row b*n + j: completion j of prompt b):
    its prompt's (computed once, copied into its n rows), then its own tokens', in place; forward advances length."""

    def __init__(self, prompt_kv, n, capacity):  # prompt_kv: per layer, keys and values (B, H, P, D)
        self.length = prompt_kv[0][0].shape[2]  # the tokens so far: the prompt's P
        room = lambda x: torch.cat([x, x.new_zeros(*x.shape[:2], capacity - self.length, x.shape[3])], 2)  # (B,H,cap,D)
        self.keys = [room(k).repeat_interleave(n, 0) for k, _ in prompt_kv]  # (R, H, capacity, D) each
        self.values = [room(v).repeat_interleave(n, 0) for _, v in prompt_kv]

    def attend(self, layer, q, k, v):  # (R, H, T, D) each, for T new tokens -> attention output (R, H, T, D)
        start, end = self.length, self.length + q.shape[2]
        self.keys[layer][:, :, start:end], self.values[layer][:, :, start:end] = k, v
        sees = torch.ones(q.shape[2], end, dtype=torch.bool, device=q.device).tril(start)  # (T, end): i sees <= start+i
        return F.scaled_dot_product_attention(q, self.keys[layer][:, :, :end], self.values[layer][:, :, :end],
                                              attn_mask=sees)


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
        else:  # after the cache's tokens
            y = cache.attend(self.layer, q, k, v)
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
        D = cfg.n_embd // cfg.n_head  # head size; rotary position embedding: angles (T, D/2)
        angles = torch.outer(torch.arange(cfg.block_size).float(), 10000.0 ** -(torch.arange(0, D, 2) / D))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.kv_cache = KVCache  # its class; the command line's keeper swaps in a faster one (notebooks/plumbing.py)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx, cache=None):
        """idx (B, T) tokens that follow the cache's tokens -> logits (B, T, V) and each layer's keys and
        values of these T tokens (B, H, T, D); a KVCache is extended in place."""
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

    def decoder(self, prompts, n, capacity):
        """Decoding n completions of each prompt (B, Tp), R = B*n rows, with a KV cache. Returns
        the first token's logits (R, V) and step(token (R, 1), alive (A,)) -> the next's (R, V).
        This one computes every row, the ended ones too (sampling does not read them); alive, the
        A rows still sampled, is for plumbing's faster decoders, which compute those alone."""
        logits, prompt_kv = self(prompts)  # (B, Tp, V)
        cache = self.kv_cache(prompt_kv, n, capacity)
        step = lambda token, alive: self(token, cache)[0][:, -1]
        return logits[:, -1].repeat_interleave(n, 0), step


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
# 3. Sampling and log-probs. Completions are (B, N, Tc) token ids with lengths (B, N): tokens at
#    positions >= length are padding (after the stop token or the token that decided the reward).

def sample_token(logits, race):  # (R, V), (R, V) -> (R, 1)
    """A draw from softmax(logits) (temperature 1) per row: with q ~ Exp(1) per token (race), argmax p / q is token
    v with probability p_v, what torch.multinomial(p, 1) draws from the same random numbers (tested)."""
    return (logits.softmax(-1) / race).argmax(-1, keepdim=True)


@torch.no_grad()  # not inference_mode: the sampled tokens go on into the training forward
def sample_completions(model, prompts, n, max_len, stop_id, generator, tracker=None, decoder=None):
    """Sample n completions per prompt at temperature 1. prompts (B, Tp) -> (B, n, Tc), (B, n).

    A completion ends at the stop token, or once the task's reward tracker (toy_tasks.py: it
    sees each token of a completion once, in order, until it ends) says its reward is decided.
    Not sampling the rest changes neither the reward nor the expected gradient (a token's score
    has mean zero given the tokens before it): the estimator stays unbiased, with less variance.
    Each row and step has its own draws, so any decoder (default model.decoder) gives the same tokens up to rounding."""
    B, R, device = prompts.shape[0], prompts.shape[0] * n, prompts.device  # row b*n + j: completion j of prompt b
    logits, decode_step = (decoder or model.decoder)(prompts, n, capacity=prompts.shape[1] + max_len)  # (R, V)
    tokens = torch.zeros(R, max_len, dtype=torch.long, device=device)  # (R, max_len); <pad> is id 0 in every task
    lengths = torch.full((R,), max_len, device=device)  # (R,)
    alive = torch.arange(R, device=device)  # (A,) the rows still being sampled
    for t in range(max_len):
        race = torch.empty_like(logits).exponential_(generator=generator)  # (R, V)
        new_token = sample_token(logits, race)[alive, 0]  # (A,)
        tokens[alive, t] = new_token
        ends = new_token == stop_id  # (A,)
        if tracker is not None:
            ends |= tracker.decided(alive, new_token)
        lengths[alive[ends]] = t + 1
        alive = alive[~ends]
        if len(alive) == 0 or t == max_len - 1:
            break  # the last token needs no forward pass
        logits = decode_step(tokens[:, t:t + 1], alive)  # (R, V); the rows that ended are not read
    return tokens[:, :t + 1].view(B, n, -1), lengths.view(B, n)  # Tc = t + 1 tokens sampled


def completion_logprobs(model, prompts, completions, lengths):
    """Sum of each completion's token log-probs (with grad). (B, Tp), (B, N, Tc), (B, N) -> (B, N).
    Each prompt runs once; its N completions read its keys and values from a KV cache, where they keep
    their autograd graph, so the gradients are exactly those of the full sequences."""
    B, N, Tc = completions.shape
    prompt_logits, prompt_kv = model(prompts)  # (B, Tp, V)
    flat = completions.reshape(B * N, Tc)  # (B*N, Tc)
    logits = prompt_logits[:, -1:].repeat_interleave(N, 0)  # (B*N, 1, V) predicts token 0
    if Tc > 1:
        cache = model.kv_cache(prompt_kv, N, capacity=prompts.shape[1] + Tc - 1)
        rest, _ = model(flat[:, :-1], cache)  # (B*N, Tc-1, V)
        logits = torch.cat([logits, rest], dim=1)  # (B*N, Tc, V)
    token_logprob = logits.log_softmax(-1).gather(-1, flat[..., None])[..., 0]  # (B*N, Tc)
    mask = torch.arange(Tc, device=flat.device) < lengths.reshape(B * N, 1)  # (B*N, Tc)
    return (token_logprob * mask).sum(-1).view(B, N)


def prompt_tensor(task, problems, device):
    return torch.tensor([task.encode_prompt(p) for p in problems], device=device)  # (B, Tp)


def reference_logprob(model, task, problems, prompts):
    """log pi(reference completion | x) per problem, with grad: (B,); log p exactly where answers are unique."""
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


def final_ks(args, ks):
    """The ks of the final evaluations (compared): up to max(--eval-samples, max(ks)), or the next power of two."""
    return eval_ks(max(args.eval_samples, max(ks)))


@torch.no_grad()
def evaluate(model, task, ks, seed, n_prompts=None, rows=1024, n_failures=3):
    """Held-out metrics on the first n_prompts held-out prompts (default all): pass@k exact, 1 - (1-p)^k with
    p by teacher forcing, where answers are unique (arith), else unbiased from n = max(ks) samples; coverage,
    the share of prompts with a success among the n. Returns the metrics, p and the success count of each
    prompt (in order), a few failures. Prompts are sampled a few at a time, about `rows` completions at once."""
    n, device, test_problems = max(ks), model.embed.weight.device, task.test_problems[:n_prompts]
    generator, batch = torch.Generator(device).manual_seed(seed), max(1, rows // n)
    successes, exact_p, failures = [], [], []
    for start in range(0, len(test_problems), batch):
        problems = test_problems[start:start + batch]
        prompts = prompt_tensor(task, problems, device)
        completions, lengths = sample_completions(model, prompts, n, task.max_completion_len, task.stop_id,
                                                  generator, task.reward_tracker(problems, n, device))
        rewards = score(task, problems, completions, lengths)  # (B, n)
        successes.append(rewards.sum(-1).cpu())
        if task.unique_answers:
            exact_p.append(reference_logprob(model, task, problems, prompts).exp().cpu())
        failures += [task.render(problem, tokens[0][:length[0]]) for problem, tokens, length, reward in
                     zip(problems, completions.tolist(), lengths.tolist(), rewards) if reward[0] == 0]
    c = torch.cat(successes).numpy()
    p = torch.cat(exact_p).double().numpy() if task.unique_answers else c / n
    metrics = {f"pass@{k}": float(np.mean(1 - (1 - p) ** k if task.unique_answers else pass_at_k(n, c, k))) for k in ks}
    metrics["coverage"] = float(np.mean(c > 0))
    return metrics, p, c.astype(int).tolist(), failures[:n_failures]


# ----------------------------------------------------------------------------------------
# 5. Training: a supervised warm start shared by all methods, then each method from the same
#    weights, seed and prompt stream, with the same number of rollouts per step.

def supervised_loss(model, task, problems, device):
    """-mean log pi(reference | x): the warm start's loss, and exact maximum likelihood (`ml`) on arith."""
    return -reference_logprob(model, task, problems, prompt_tensor(task, problems, device)).mean()


def rl_loss(model, task, problems, method, N, generator, device, expected=False):
    """One RL step's loss: sample N completions per prompt, score them, weight their log-probs. Or, with
    expected (unique answers): no sampling, the estimator's exact expected gradient, [w_N(p) p] grad log p."""
    prompts = prompt_tensor(task, problems, device)  # (B, Tp)
    if expected:  # E[(1/N) sum_j A_j S_j] = w_N(p) grad p, and grad p = p grad log p with p = pi(answer | x)
        log_p = reference_logprob(model, task, problems, prompts)  # (B,)
        p = log_p.detach().exp()  # (B,) exact, by teacher forcing
        coefficient = torch.as_tensor(weight(method, p.double().cpu().numpy(), N), device=device) * p  # (B,)
        return -(coefficient.float() * log_p).mean(), {"reward": p.mean().item()}
    completions, lengths = sample_completions(model, prompts, N, task.max_completion_len, task.stop_id, generator,
                                              task.reward_tracker(problems, N, device))  # (B, N, Tc), (B, N)
    rewards = score(task, problems, completions, lengths)  # (B, N)
    advantages = ESTIMATORS[method](rewards)  # (B, N)
    has_signal = (advantages != 0).any(-1)  # (B,) the groups whose gradient is not zero
    run = has_signal.clone()  # (B,) the groups run through the model: those, or one if none has signal
    run[0] |= ~has_signal.any()  # (a zero gradient, but the loss keeps a graph and every parameter gets one)
    seq_logprob = torch.zeros_like(advantages)  # (B, N); a zero-advantage group adds 0 whatever its log-probs
    seq_logprob[run] = completion_logprobs(model, prompts[run], completions[run], lengths[run])
    loss = policy_gradient_loss(seq_logprob, advantages)
    return loss, {"reward": rewards.mean().item(), "no_signal": 1 - has_signal.float().mean().item()}


def average_gradients(model):
    """torchrun: each gradient, its mean over the processes (each holds whole groups: advantages need no exchange)."""
    for parameter in model.parameters() if WORLD > 1 else []:
        torch.distributed.all_reduce(parameter.grad.div_(WORLD))


def warm_start(model, task, args, device):
    """Supervised fine-tuning on reference completions (BFS shortest paths, true answers): RL starts at p > 0.
    Always on fresh problems, as pretraining is: --train-pool fixes only what RL trains on."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    rng = random.Random(f"sft-{args.seed}")
    for _ in tqdm(range(args.sft_steps), desc="warm start", disable=RANK > 0 or None):  # bars: on a terminal
        problems = task.sample_train(args.sft_batch, rng, from_pool=False)[RANK::WORLD]  # fresh: the pool is RL's
        loss = supervised_loss(model, task, problems, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model)  # torchrun: over the processes
        optimizer.step()


def log_evaluation(model, task, args, ks, step, log, print_as=None, n_prompts=None):
    """A point of the curve: held-out metrics at this step, and the training stats since the last point."""
    metrics, _, log["successes"], log["failures"] = evaluate(model, task, ks, args.seed + 1, n_prompts)
    window, log["window"] = log["window"], []
    train = {f"train_{key}": float(np.mean([s[key] for s in window])) for key in (window[0] if window else {})}
    point = {"step": step, "rollouts": step * args.batch * args.N, **metrics, **train, "successes": log["successes"]}
    if log["curve"][-1]["step"] == step:  # stopped right after an evaluation: the final one takes its place
        point = log["curve"].pop() | point
    log["curve"].append(point)
    if print_as:
        print(f"{print_as}: step {step}/{args.steps} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


def train_method(method, model, task, args, device, initial, ks, keeper=None):
    """Train one method from the weights in `model` for --steps on-policy updates on --batch prompts each
    (`ml`: cross-entropy steps); held-out pass@k every --eval-every. keeper: None, or the command line's:
    it restores `training` (--resume), checkpoints it, and says when Ctrl-C asks to stop."""
    optimizer = (torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9) if args.optimizer == "sgd"
                 else torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0))
    prompt_rng = random.Random(f"prompts-{args.seed}")  # the same prompts for every method
    generator = torch.Generator(device).manual_seed(args.seed + 1_000_003 * RANK)  # the rollouts' draws
    log = dict(curve=[{"step": 0, "rollouts": 0, **initial}], window=[], successes=[], failures=[], wall_s=0.0)
    training = {"model": model, "optimizer": optimizer, "prompt_rng": prompt_rng, "generator": generator, "log": log}
    step = keeper.restore(method, training) if keeper else 0  # the last step done (--resume: the checkpoint's)
    started, label = time.time() - log["wall_s"], f"{method:>5} N={args.N:<4} seed {args.seed}"
    bar = tqdm(range(step + 1, args.steps + 1), initial=step, total=args.steps, desc=label, disable=RANK > 0 or None)
    print_as = label if bar.disable and RANK == 0 else None  # no progress bar (output to a file): a line per evaluation
    for step in bar:
        problems = task.sample_train(args.batch, prompt_rng)[RANK::WORLD]  # prompts (this process's share)
        loss, stats = ((supervised_loss(model, task, problems, device), {}) if method == "ml"  # rollouts, rewards,
                       else rl_loss(model, task, problems, method, args.N, generator, device,  # the loss
                                    expected=args.expected_gradient))
        optimizer.zero_grad(set_to_none=True)  # backward (torchrun: averaged over the processes) and update
        loss.backward()
        average_gradients(model)
        stats["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()  # not clipped
        if not math.isfinite(stats["grad_norm"]):
            raise RuntimeError("non-finite gradient: did training diverge?")
        optimizer.step()
        log["window"].append(stats)
        if step % args.eval_every == 0 and step < args.steps:  # evaluate (--curve-prompts: fewer prompts, more samples)
            log_evaluation(model, task, args, final_ks(args, ks) if args.curve_prompts else ks, step, log,
                           print_as, args.curve_prompts or None)
        bar.set_postfix(reward=stats.get("reward", float("nan")), test_pass1=log["curve"][-1]["pass@1"])
        log["wall_s"] = time.time() - started
        if keeper and keeper.after_step(method, step, training):  # checkpoint when due; Ctrl-C: stop
            break
    if step > 0:  # the final evaluation, with more samples, of the weights it ended (or stopped) with
        log_evaluation(model, task, args, final_ks(args, ks), step, log, print_as)
    return {"final": log["curve"][-1], "curve": log["curve"], "wall_s": time.time() - started,
            "failures": log["failures"], "per_prompt_successes": log["successes"], "interrupted": step < args.steps}


# ----------------------------------------------------------------------------------------
# 6. The main command: one warm start, every method from it; the table, each against maxrl, results.json.

def shared_start(model, task, args, device, ks, keeper=None):
    """The warm start every method trains from and its held-out metrics (the keeper's: both cached on disk)."""
    started, ks = time.time(), final_ks(args, ks)
    (keeper.warm_start if keeper else warm_start)(model, task, args, device)
    initial, per_prompt_p, successes, _ = (keeper.evaluate_start if keeper else evaluate)(model, task, ks, args.seed+1)
    print(f"held-out pass rate after warm start: mean {per_prompt_p.mean():.3f}; "
          f"{np.mean(np.array(successes) == 0):.0%} of prompts unsolved in {max(ks)} samples")
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "initial": initial,
            "per_prompt_p": per_prompt_p, "successes": successes, "warm_start_s": time.time() - started}


def bootstrap(per_run, resamples=2000, seed=0):
    """Per-prompt values [(P, ...) per run] -> the mean over runs of each run's mean over prompts, and `resamples`
    copies of it, prompts drawn with replacement in each run: the same draws whatever the values (so, paired)."""
    rng, copies = np.random.default_rng(seed), []
    for values in per_run:
        draws = rng.integers(0, len(values), (resamples, len(values)))  # (resamples, P) prompt indices
        weights = np.stack([np.bincount(row, minlength=len(values)) for row in draws]) / len(values)  # (resamples, P)
        copies.append((weights @ values.reshape(len(values), -1)).reshape(resamples, *values.shape[1:]))
    return np.mean([values.mean(0) for values in per_run], 0), np.mean(copies, 0)


def mean_interval(per_run, resamples=2000, seed=0):
    """[mean, low, high]: bootstrap's mean of per-prompt values (per_run: [(P,) per run]) and its 95% interval."""
    mean, copies = bootstrap(per_run, resamples, seed)
    return [float(mean), *np.percentile(copies, [2.5, 97.5]).tolist()]


def paired_differences(runs, n, ks, reference="maxrl", resamples=2000, seed=0):
    """{name: {metric: [mean, low, high]}}: metric(reference) - metric(name) on the same held-out prompts, pass@k
    (unbiased, from n samples) and coverage; runs: [{name: success count per prompt}], pooled by mean_interval."""
    per_prompt = lambda c: {**{f"pass@{k}": pass_at_k(n, c, k) for k in ks}, "coverage": (c > 0) * 1.0}  # (P,) each
    tables = [{name: per_prompt(np.asarray(c, dtype=np.float64)) for name, c in run.items()} for run in runs]
    return {name: {metric: mean_interval([t[reference][metric] - t[name][metric] for t in tables], resamples, seed)
                   for metric in tables[0][name]} for name in runs[0] if name != reference}


def print_paired(table, reference, what):
    print(f"\n{reference} minus each, {what} (mean, 95% bootstrap interval over prompts):")
    for name, row in table.items():
        print(f"{name:>13} " + "  ".join(f"{m} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, (d, lo, hi) in row.items()))


def flag_record(args):
    """The flags of a run, as written to its JSON."""
    return {k: v if isinstance(v, (int, float, str, list, type(None))) else str(v)
            for k, v in vars(args).items() if k not in ("task_obj", "out")} | {"rank": RANK, "world": WORLD}


def success_table(summary):
    """{"start", each method evaluated: success count per held-out prompt} of results.json; the reference (maxrl)."""
    successes = {"start": summary["initial_per_prompt_successes"]} | {
        name: r["per_prompt_successes"] for name, r in summary["methods"].items() if r["per_prompt_successes"]}
    return successes, "maxrl" if "maxrl" in successes else list(successes)[-1]


def report(args, task, model_cfg, device, start, results, ks):
    """Print the table, a few failures, each method against maxrl on the same held-out prompts (from the
    final evaluations' n samples each); write all of it to results.json. Returns the summary."""
    n = max(final_ks(args, ks))
    columns = [f"pass@{k}" for k in sorted({*ks, n})] + ["coverage"]
    print(f"\n{'method':>13} " + " ".join(f"{c:>9}" for c in columns) + f" {'wall s':>8}")
    for name, metrics, wall in [("start", start["initial"], start["warm_start_s"])] + [
            (m, r["final"], r["wall_s"]) for m, r in results.items()]:
        print(f"{name:>13} " + " ".join(f"{metrics[c]:>9.3f}" for c in columns) + f" {wall:>8.0f}")
    print("".join(f"  {m} failure: {failure}\n" for m, r in results.items() for failure in r["failures"][:2]), end="")
    config = flag_record(args) | {
        "model": asdict(model_cfg), "device": str(device),
        "pass@k_estimator": "exact, 1-(1-p)^k" if task.unique_answers else f"unbiased, n={n}"}
    summary = {"task": args.task, "N": args.N, "seed": args.seed, "config": config,
               "interrupted": len(results) < len(args.methods) or any(r["interrupted"] for r in results.values()),
               "initial_pass_rate_quartiles": np.percentile(start["per_prompt_p"], [25, 50, 75]).tolist(),
               "initial": start["initial"], "initial_per_prompt_successes": start["successes"], "samples_per_prompt": n,
               "warm_start_wall_s": start["warm_start_s"], "methods": results}
    successes, reference = success_table(summary)
    paired = paired_differences([successes], n, sorted({1, max(ks), n}), reference)
    print_paired(paired, reference, f"on the same {len(task.test_problems)} held-out prompts (from {n} samples each)")
    summary |= {"reference": reference, "paired": paired}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}/results.json"
          + (f" (interrupted: continue with --resume --out={args.out})" if summary["interrupted"] else ""))
    return summary


def compare_methods(args, task, keeper=None):
    """The main command (python maxrl.py --task=nav --N=16): one warm start, then each of --methods from it with
    the same prompts, seed and rollouts per step; then the report. keeper: None, or the command line's (the model
    set up, the warm start cached, checkpoints, --resume). Returns the model as the last method left it, the summary."""
    ks = eval_ks(args.N)
    model, model_cfg, device = build_model(args, task)
    resumed = keeper.prepare(model, device) if keeper else None  # --resume: the interrupted run so far
    start = resumed["start"] if resumed else shared_start(model, task, args, device, ks, keeper)
    results = resumed["results"] if resumed else {}
    for method in [m for m in args.methods if m not in results]:
        if keeper:
            keeper.save(start, results)  # the warm start and the methods done
        model.load_state_dict(start["weights"])
        results[method] = train_method(method, model, task, args, device, start["initial"], ks, keeper)
        if results[method]["interrupted"]:
            break
    if RANK > 0:  # under torchrun only the first process reports
        return model, None
    return model, report(args, task, model_cfg, device, start, results, ks)


# ========================================================================================
# End of the lesson; a reader may stop here. What follows: 7. the estimator families (any
# order T <= N, and pass@k), which ESTIMATORS then holds too.
# ========================================================================================

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


if __name__ == "__main__":  # the command line (flags, checks, experiments) is notebooks/command_line.py
    import sys
    sys.modules["maxrl"] = sys.modules[__name__]  # its `import maxrl` is this module, not a second copy of the file
    sys.path.append(str(Path(__file__).resolve().parent / "notebooks"))
    import command_line  # the one import that points up: the script hands over to the command line
    command_line.main()
