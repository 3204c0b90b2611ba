"""What keeps the work of `python maxrl.py` runs, out of the lesson's way: the RunKeeper that
the lesson's main command and training loop reach through their `keeper` argument (the warm
start cached on disk; checkpoints every --ckpt-every steps and on Ctrl-C, exit code 130, that
--resume continues from; torchrun's processes kept in step; the GPU options --compile, TF32 and
--cuda-graphs), and the faster decoders that draw the same tokens as the lesson's. On one
process, the cache and checkpoints change no result (tests check: cached, rebuilt, uncached and
resumed runs end with identical results.json).
"""

import ctypes
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import maxrl
import toy_tasks

WARM_START_FLAGS = ("task", "size", "max_moves", "loops", "digits", "ops", "single_token",
                    "eval_prompts", "n_layer", "n_head", "n_embd", "sft_steps", "sft_batch", "sft_lr", "seed",
                    "compile")
NOT_RESUMED_FLAGS = ("resume", "overwrite", "ckpt_every", "cache_dir", "no_cache", "rank")
stop_requested = False  # set by Ctrl-C (request_stop): the run stops after its current step


def request_stop(signum, frame):
    global stop_requested
    if stop_requested:  # a second Ctrl-C stops at once
        raise KeyboardInterrupt
    stop_requested = True
    print("\nCtrl-C: stopping after this step (again to stop at once)", file=sys.stderr)


def keep_freed_memory():
    """Linux (glibc): keep freed memory in the process for reuse. By default glibc gives blocks over
    128 KB back to the system when freed, and the system zeroes every page of the next such block
    again: decoding's per-step tensors made half of a run's CPU time kernel time (the main command,
    cached, 56 s -> 35 s wall on a 2-core EPYC with this, the same results). Blocks up to 32 MB now
    come from the heap, which is never trimmed; the peak memory is unchanged."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to do
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def resumable_flags(args):
    """The flags a resumed run must share with the run it continues."""
    return {k: v for k, v in maxrl.flag_record(args).items() if k not in NOT_RESUMED_FLAGS}


def load_checkpoint(path):
    """A checkpoint's contents, every tensor on the CPU, whatever device wrote it or will use it
    (a generator's state must be a CPU tensor; the model and optimizer copy theirs over)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def warm_start_key(args, device):
    """A short hash of everything the warm-started weights depend on: the flags above
    (eval_prompts fixes the held-out split, which training never draws from), the number of
    processes, the device type, the torch version, and this code (an edited maxrl.py, toy_tasks.py
    or this file, whose decoders sample the warm start's evaluation, never reuses old results)."""
    code = b"".join(Path(path).read_bytes() for path in (maxrl.__file__, toy_tasks.__file__, __file__))
    depends_on = {flag: getattr(args, flag) for flag in WARM_START_FLAGS}
    depends_on |= {"world": maxrl.WORLD, "device": device.type, "torch": torch.__version__,
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


def save_atomic(state, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


@torch.no_grad()
def reference_route(model, task, batch=64):
    """Teacher forcing on each held-out prompt's reference completion (mazes: the shortest route, what the
    warm start was trained on): "route_token_accuracy", the share of its tokens the model ranks first, and
    "route_prob", the mean probability of the whole completion. A model that reads the maze move by move
    but fails by compounding small errors over long walks has a high first and a low second."""
    device, ranked_first, tokens, route_prob = model.embed.weight.device, 0, 0, []
    for start in range(0, len(task.test_problems), batch):
        problems = task.test_problems[start:start + batch]
        prompts = maxrl.prompt_tensor(task, problems, device)  # (B, Tp)
        refs = [task.reference_completion(problem) for problem in problems]
        Tc = max(map(len, refs))
        targets = torch.tensor([r + [task.pad_id] * (Tc - len(r)) for r in refs], device=device)  # (B, Tc)
        logits, _ = model(torch.cat([prompts, targets[:, :-1]], 1))  # (B, Tp+Tc-1, V)
        logits = logits[:, prompts.shape[1] - 1:]  # (B, Tc, V) each predicts a token of the completion
        mask = torch.arange(Tc, device=device) < torch.tensor([[len(r)] for r in refs], device=device)  # (B, Tc)
        ranked_first += ((logits.argmax(-1) == targets) & mask).sum().item()
        tokens += mask.sum().item()
        token_logprob = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]  # (B, Tc)
        route_prob += (token_logprob * mask).sum(-1).exp().tolist()
    return {"route_token_accuracy": ranked_first / tokens, "route_prob": sum(route_prob) / len(route_prob)}


class RunKeeper:
    """The `keeper` of maxrl.compare_methods and train_method, for python maxrl.py and the
    experiments: prepare sets the model up (its KV cache and decoder, the GPU options) and returns
    the run to continue (--resume); warm_start is cached in --cache-dir; with checkpoints (the
    main command), save and after_step write --out/checkpoint.pt, prepare reads it back, restore puts it in place.
    The KV cache: SharedPrefixCache (each prompt's keys stored once). The decoder: CUDAGraphs with
    --cuda-graphs; on a CPU the CompactingDecoder (rows that ended leave the batch); else the
    lesson's (every row every step). Tests pick them directly: model.kv_cache, and
    sample_completions' decoder argument."""

    def __init__(self, args, checkpoints=False):
        self.args, self.checkpoint = args, args.out / "checkpoint.pt" if checkpoints else None
        self.run, self.progress = None, None  # the run's state (warm start, methods done), the saved progress
        self.final_weights = {}  # method -> the weights it ended with (the methods trained in this process)

    def prepare(self, model, device):
        keep_freed_memory()
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
        if self.args.compile:
            model.compile(dynamic=True)  # sequence lengths vary from call to call
        model.kv_cache = SharedPrefixCache  # sampling on a GPU without graphs, and every training step
        if self.args.cuda_graphs:
            model.decoder = CUDAGraphs(model).decoder
        elif device.type == "cpu":
            model.decoder = CompactingDecoder(model)
        if not self.args.resume:
            return None
        saved = load_checkpoint(self.checkpoint)
        self.progress = saved["current"]
        return {"start": saved["start"], "results": saved["results"]}

    def warm_start(self, model, task, args, device):
        cache_file = Path(args.cache_dir) / f"warm-start-{warm_start_key(args, device)}.pt"
        if args.sft_steps and not args.no_cache and load_cached_weights(model, cache_file):
            print(f"warm start: loaded from {cache_file} (--no-cache recomputes it)")
            return
        maxrl.warm_start(model, task, args, device)
        if args.sft_steps and not args.no_cache and maxrl.RANK == 0:
            save_atomic(model.state_dict(), cache_file)

    def evaluate_start(self, model, task, ks, seed):
        """maxrl.evaluate of the warm start, cached beside its weights (the same key, the ks and seed)."""
        args, device = self.args, model.embed.weight.device
        cache_file = Path(args.cache_dir) / f"warm-start-{warm_start_key(args, device)}-eval-{max(ks)}-{seed}.pt"
        cached = args.sft_steps and not args.no_cache
        if cached and cache_file.exists():
            try:
                return torch.load(cache_file, weights_only=False)
            except Exception:  # truncated or unreadable: recompute
                pass
        evaluation = maxrl.evaluate(model, task, ks, seed)
        evaluation[0].update(reference_route(model, task))
        if cached and maxrl.RANK == 0:
            save_atomic(evaluation, cache_file)
        return evaluation

    def trained_weights(self):
        """{"start": the warm start's weights} and each method's final weights (those trained in this process)."""
        return {"start": self.run["start"]["weights"]} | self.final_weights

    def save(self, start, results, current=None):
        self.run = {"start": start, "results": results}
        if self.checkpoint and maxrl.RANK == 0:
            save_atomic({"flags": resumable_flags(self.args), **self.run, "current": current}, self.checkpoint)

    def restore(self, method, training):
        """The saved progress of this method, if the run being continued stopped in it, into the
        training state; returns the last step done (0 for a fresh start)."""
        progress, self.progress = self.progress, None
        if not progress or progress["method"] != method:
            return 0
        training["model"].load_state_dict(progress["model"])
        training["optimizer"].load_state_dict(progress["optimizer"])
        training["prompt_rng"].setstate(progress["prompt_rng"])
        training["generator"].set_state(progress["generator"])
        training["log"].update(progress["log"])
        return progress["step"]

    def after_step(self, method, step, training):
        """Save the method's progress every --ckpt-every steps and when asked to stop; returns
        whether to stop (Ctrl-C on any process, under torchrun)."""
        stop = stop_requested
        if step == self.args.steps:
            self.final_weights[method] = {k: v.detach().clone() for k, v in training["model"].state_dict().items()}
        if maxrl.WORLD > 1:  # Ctrl-C reaches the processes at slightly different steps
            flag = torch.tensor([float(stop)], device=training["model"].embed.weight.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if self.checkpoint and (stop or (self.args.ckpt_every and step % self.args.ckpt_every == 0)):
            self.save(self.run["start"], self.run["results"], {
                "method": method, "step": step, "model": training["model"].state_dict(),
                "optimizer": training["optimizer"].state_dict(), "prompt_rng": training["prompt_rng"].getstate(),
                "generator": training["generator"].get_state(), "log": training["log"]})
        return stop


class SharedPrefixCache:
    """The lesson's KVCache (the same interface and results) with each prompt's keys and values stored once for
    its n rows, not copied into each (cascade attention): a row's scores over its prompt's keys are computed
    per prompt group, beside those over its own keys, under one softmax. The command line's (RunKeeper.prepare)."""

    def __init__(self, prompt_kv, n, capacity):
        B, H, P, D = prompt_kv[0][0].shape
        self.prompt_kv, self.n, self.length = prompt_kv, n, P
        self.keys = [k.new_empty(B * n, H, capacity - P, D) for k, _ in prompt_kv]  # each row's own, after the prompt
        self.values = [v.new_empty(B * n, H, capacity - P, D) for _, v in prompt_kv]

    def group(self, x):  # (R, ...) -> (B, n, ...): each prompt's rows together
        return x.view(-1, self.n, *x.shape[1:])

    def ungroup(self, x):  # (B, n, ...) -> (R, ...)
        return x.flatten(0, 1)

    def attend(self, layer, q, k, v):  # (R, H, T, D) each, for T new tokens -> attention output (R, H, T, D)
        prompt_k, prompt_v = self.prompt_kv[layer]  # (B, H, P, D)
        P, T, D = prompt_k.shape[2], q.shape[2], q.shape[3]
        start, end = self.length - P, self.length - P + T  # the new tokens' place among each row's own
        self.keys[layer][:, :, start:end], self.values[layer][:, :, start:end] = k, v
        own_k, own_v = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # (R, H, end, D)
        q = q / math.sqrt(D)
        prompt_scores = self.ungroup(torch.einsum("bjhtd,bhpd->bjhtp", self.group(q), prompt_k))  # (R, H, T, P)
        own_scores = q @ own_k.transpose(-1, -2)  # (R, H, T, end)
        if T > 1:  # new token i sees all of the prompt, and of its row's own tokens those up to itself
            future = torch.ones(T, end, dtype=torch.bool, device=q.device).triu(start + 1)  # (T, end)
            own_scores = own_scores.masked_fill(future, float("-inf"))
        weights = torch.cat([prompt_scores, own_scores], -1).softmax(-1)  # (R, H, T, P+end): one softmax over both
        from_prompt = torch.einsum("bjhtp,bhpd->bjhtd", self.group(weights[..., :P]), prompt_v)  # (B, n, H, T, D)
        return self.ungroup(from_prompt) + weights[..., P:] @ own_v


class CompactingCache(SharedPrefixCache):
    """A SharedPrefixCache that holds only some of the R rows, `rows` (in order): the others have left the batch.
    Grouping by prompt puts the rows still held in their places among all R (zeros where rows left), so
    that each prompt's keys and values stay shared; the rows that left cost only that share."""

    def __init__(self, prompt_kv, n, capacity):
        super().__init__(prompt_kv, n, capacity)
        self.rows = torch.arange(len(self.keys[0]), device=self.keys[0].device)  # (R_in,) all R at first

    def keep(self, rows):  # (R_kept,) a subset of self.rows
        kept = torch.isin(self.rows, rows)
        self.keys, self.values = [k[kept] for k in self.keys], [v[kept] for v in self.values]
        self.rows = rows

    def group(self, x):  # (R_in, ...) -> (B, n, ...)
        every_row = x.new_zeros(self.prompt_kv[0][0].shape[0] * self.n, *x.shape[1:])
        every_row[self.rows] = x
        return super().group(every_row)

    def ungroup(self, x):  # (B, n, ...) -> (R_in, ...)
        return super().ungroup(x)[self.rows]


class CompactingDecoder:
    """As Transformer.decoder (the lesson's), but the rows that ended leave the batch (and the
    KV cache: a CompactingCache) once a quarter of those still in it have ended: the work
    shrinks as completions end, which pays on a CPU. A GPU would wait for the host at each
    compaction and lose its fixed shapes (CUDA graphs). recompute: no KV cache, the whole
    sequences (prompt copied into each) run again at every step: the plain decoder, slow; the
    tests and --bench compare the others with it."""

    def __init__(self, model, recompute=False):
        self.model, self.recompute = model, recompute

    def __call__(self, prompts, n, capacity):
        model, sequences, cache = self.model, None, None
        if self.recompute:
            sequences = prompts.repeat_interleave(n, 0)  # (R, Tp)
            logits = model(sequences)[0][:, -1]  # (R, V)
        else:
            prompt_logits, prompt_kv = model(prompts)
            logits, cache = prompt_logits[:, -1].repeat_interleave(n, 0), CompactingCache(prompt_kv, n, capacity)
        rows = torch.arange(len(logits), device=prompts.device)  # (R_in,) the rows in the batch

        def step(token, alive):  # (R, 1), (A,) -> (R, V): logits of the rows in the batch, zeros for those that left
            nonlocal rows, sequences
            if 4 * (len(rows) - len(alive)) >= len(rows):  # a quarter ended: the others go on alone
                if cache is not None:
                    cache.keep(alive)
                else:
                    sequences = sequences[torch.isin(rows, alive)]
                rows = alive
            if self.recompute:
                sequences = torch.cat([sequences, token[rows]], dim=1)
                out = model(sequences)[0][:, -1]
            else:
                out = model(token[rows], cache)[0][:, -1]
            full = out.new_zeros(len(token), out.shape[-1])
            full[rows] = out
            return full
        return logits, step


class CUDAGraphs:
    """--cuda-graphs: sampling's one-token step (Transformer.decoder) replayed from recorded CUDA graphs.

    At this size a GPU spends a decoding step launching ~100 tiny kernels from Python, not
    computing. A CUDA graph records one step's kernels once and replays them with one launch.
    A graph fixes every shape and address, so each (prompts, n, prompt length, capacity) gets its
    own KV cache and input buffer, and within it one graph per position: the step at position
    P + t attends to the same P + t + 1 keys as the plain step, so a replay computes what
    model(token, cache) computes, bit for bit (a GPU test checks). Graphs read the weights
    where they live, and optimizers update them in place, so recordings stay valid. Each shape
    keeps its cache for the whole run: a few GB over --paper-size's sweep of N."""

    def __init__(self, model):
        self.model, self.pool = model, None  # the graphs' shared memory pool, made at the first recording
        self.buffers = {}  # (B, n, P, capacity) -> cache, token buffer, {position: (graph, logits)}

    def decoder(self, prompts, n, capacity):  # as Transformer.decoder; one in use per shape
        logits, prompt_kv = self.model(prompts)
        rows, prompt_len = prompts.shape[0] * n, prompts.shape[1]
        key = (prompts.shape[0], n, prompt_len, capacity)  # (B, n), not only rows = B*n: the cache groups by prompt
        if key in self.buffers:  # the graphs read the prompt's keys and values where the first call left them
            for buffers, new in zip(self.buffers[key][0].prompt_kv, prompt_kv):
                buffers[0].copy_(new[0])
                buffers[1].copy_(new[1])
        else:
            token = torch.zeros(rows, 1, dtype=torch.long, device=prompts.device)
            self.buffers[key] = SharedPrefixCache(prompt_kv, n, capacity), token, {}
        cache, token_buffer, graphs = self.buffers[key]
        cache.length = prompt_len

        def step(token, alive):  # (rows, 1) -> (rows, V), valid until the next step; every row computed
            position = cache.length
            token_buffer.copy_(token)
            if position not in graphs:
                graphs[position] = self.record(cache, token_buffer)
            graph, logits = graphs[position]
            graph.replay()
            cache.length = position + 1
            return logits
        return logits[:, -1].repeat_interleave(n, 0), step

    def record(self, cache, token_buffer):  # -> a graph whose replay() computes this step into `logits`, and logits
        self.pool = self.pool or torch.cuda.graph_pool_handle()
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
