"""What keeps the work of `python maxrl.py` runs, out of the lesson's way: the warm start
cached on disk, checkpoints every --ckpt-every steps and on Ctrl-C (exit code 130) that
--resume continues from, torchrun's processes kept in step, and the GPU options (--compile,
TF32, --cuda-graphs). maxrl.py's lesson calls all of it through the `Run` interface; its
command line passes a CommandLineRun. On one process, the cache and checkpoints change no result
(tests check: cached, rebuilt, uncached and resumed runs end with identical results.json).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import maxrl
import toy_tasks

WARM_START_FLAGS = ("task", "size", "max_moves", "loops", "digits", "ops", "single_token", "train_pool",
                    "eval_prompts", "n_layer", "n_head", "n_embd", "sft_steps", "sft_batch", "sft_lr", "seed",
                    "world", "compile")


def warm_start_key(args, device):
    """A short hash of everything the warm-started weights depend on: the flags above
    (eval_prompts fixes the held-out split, which training never draws from), the device type,
    the torch version, and this code (an edited maxrl.py or toy_tasks.py never reuses old weights)."""
    code = b"".join(Path(path).read_bytes() for path in (maxrl.__file__, toy_tasks.__file__))  # also under cProfile
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


def save_atomic(state, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def request_stop(signum, frame):
    if maxrl.Run.stop_requested:  # a second Ctrl-C stops at once
        raise KeyboardInterrupt
    maxrl.Run.stop_requested = True
    print("\nCtrl-C: stopping after this step (again to stop at once)", file=sys.stderr)


def average_gradients_over_processes(model):
    """torchrun: once a backward has made every gradient, each is averaged over the processes,
    in parameter order (what DistributedDataParallel does, unbucketed). Each process holds whole
    groups, so advantages need no communication."""
    parameters, ready = list(model.parameters()), []

    def on_gradient(parameter):
        ready.append(parameter)
        if len(ready) == len(parameters):  # the backward is done with every parameter
            for p in parameters:
                dist.all_reduce(p.grad.div_(dist.get_world_size()))
            ready.clear()
    for parameter in parameters:
        parameter.register_post_accumulate_grad_hook(on_gradient)


class CommandLineRun(maxrl.Run):
    """The Run of python maxrl.py: the warm start cached in --cache-dir; the GPU options
    (--compile, --cuda-graphs, TF32); torchrun's processes in step; and, with checkpoints (the
    main command), the run's state in --out/checkpoint.pt, which --resume continues from."""

    def __init__(self, args, checkpoints=False):
        super().__init__(args)
        self.checkpoint, self.state = args.out / "checkpoint.pt" if checkpoints else None, None

    def model(self, task):
        if self.args.world > 1 and self.args.device != "cpu" and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per process, its streams there
        model, model_cfg, device = maxrl.build_model(self.args, task)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
        if self.args.compile:
            model.compile(dynamic=True)  # sequence lengths vary from call to call
        if self.args.cuda_graphs:
            model.decoder = CUDAGraphs(model).decoder
        if self.args.world > 1:
            average_gradients_over_processes(model)
        return model, model_cfg, device

    def warm_start(self, model, task, device):
        args = self.args
        cache_file = Path(args.cache_dir) / f"warm-start-{warm_start_key(args, device)}.pt"
        if args.sft_steps and not args.no_cache and load_cached_weights(model, cache_file):
            print(f"warm start: loaded from {cache_file} (--no-cache recomputes it)")
            return
        maxrl.warm_start(model, task, args, device)
        if args.sft_steps and not args.no_cache and args.rank == 0:
            save_atomic(model.state_dict(), cache_file)

    def stop(self, device):  # Ctrl-C reaches the processes at slightly different steps: stop if any has it
        if self.args.world == 1:
            return maxrl.Run.stop_requested
        flag = torch.tensor([float(maxrl.Run.stop_requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def saved(self, device):
        return torch.load(self.checkpoint, map_location=device, weights_only=False) if self.args.resume else None

    def save(self, state):
        self.state = state | {"flags": maxrl.resumable_flags(self.args)}
        if self.checkpoint and self.args.rank == 0:
            save_atomic(self.state, self.checkpoint)

    def save_progress(self, method, progress):
        if self.checkpoint:
            self.save(self.state | {"current": {"method": method, "state": progress}})

    def finish(self, summary):  # the paired comparison and where it comes from; then no checkpoint is needed
        import experiments
        experiments.report_paired(summary, self.args)
        if self.checkpoint and not summary["interrupted"]:
            self.checkpoint.unlink()


class CUDAGraphs:
    """--cuda-graphs: sampling's one-token step (Transformer.decoder) replayed from recorded CUDA graphs.

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

    def decoder(self, prompt_kv, n, capacity):  # as Transformer.decoder; one in use per shape
        rows, prompt_len = prompt_kv[0][0].shape[0] * n, prompt_kv[0][0].shape[2]
        key = (rows, prompt_len, capacity)
        if key in self.buffers:
            self.buffers[key][0].fill(prompt_kv, n)
        else:
            token = torch.zeros(rows, 1, dtype=torch.long, device=prompt_kv[0][0].device)
            self.buffers[key] = maxrl.KVCache(prompt_kv, n, capacity), token, {}  # filled on creation
        cache, token_buffer, graphs = self.buffers[key]

        def step(token, keep=None):  # (rows, 1) -> (rows, V), valid until the next step
            assert keep is None, "on a GPU, rows never leave the batch (sample_completions)"
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
