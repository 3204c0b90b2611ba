"""The command line of python maxrl.py: the flags, every check of them, and the dispatch to the
main command (maxrl.compare_methods) or an experiment (experiments.py). Every check runs before
anything is built or written; bad input is one line on stderr and exit code 2, no traceback.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import experiments
import maxrl
import plumbing
from maxrl import ESTIMATORS, FAMILIES, estimator_problem, eval_ks, final_ks
from toy_tasks import make_task

HERE = Path(maxrl.__file__).resolve().parent

EXPERIMENTS = ("compare", "weights", "gradnorm", "gradcos", "variance", "interpolation", "order", "scaling",
               "data", "bench")  # all but compare are in notebooks/experiments.py
EXACT_P_EXPERIMENTS = ("weights", "gradnorm", "gradcos", "variance", "interpolation", "order")  # need arith
SWEEPS = ("interpolation", "order", "scaling")  # train runs over --Ns
TASK_DEFAULTS = {"arith": {"sft_steps": 400, "sft_batch": 64, "sft_lr": 1e-3, "steps": 100, "lr": 1e-4,
                           "eval_prompts": 128, "eval_every": 10, "curve_prompts": 0}}  # where not nav's
EXPERIMENT_DEFAULTS = {  # where an experiment's defaults differ from compare's; explicit flags win
    "interpolation": {"sft_steps": 30, "steps": 250, "lr": 3e-4, "eval_every": 50, "Ns": "4,16,64",
                      "Ts": "1,3,15,63,255,1023", "eval_samples": 0, "curve_prompts": 0},
    "order": {"single_token": True, "sft_steps": 0, "steps": 500, "lr": 1e-3, "eval_every": 25, "N": 256,
              "eval_samples": 0, "curve_prompts": 0},
    "scaling": {"Ns": "4,16,64", "steps": 100, "batch": 8, "eval_every": 1000, "curve_prompts": 0},
    "data": {"train_pool": 32, "steps": 200, "eval_every": 25},
}
SINGLE_TOKEN_INTERPOLATION = {"sft_steps": 0, "steps": 500, "lr": 1e-3, "Ns": "4,16,64,256,1024",
                              "Ts": "1,3,15,63,255,1023"}  # from p = 1/216, the paper's classification study
PAPER_SIZE = {"size": 17, "max_moves": 0, "n_embd": 256, "sft_steps": 1500, "sft_lr": 5e-4, "sft_batch": 32, "lr": 1e-4,
              "Ns": "4,8,16,32,64,128", "steps": 200, "batch": 16, "eval_prompts": 128}
DEFAULTS_HELP = "defaults that differ from those above (nav, compare):\n" + "\n".join(
    f"  {name}: " + " ".join(f"--{key.replace('_', '-')}={value}" for key, value in flags.items())
    for name, flags in [("--task=arith", TASK_DEFAULTS["arith"]), *EXPERIMENT_DEFAULTS.items(),
                        ("interpolation --single-token", SINGLE_TOKEN_INTERPOLATION), ("scaling --paper-size", PAPER_SIZE)])


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
    group.add_argument("--max-moves", type=NATURAL, default=0,
                       help="nav: 0 = start and goal at opposite corners, every walk long (the paper's mazes); "
                            "D > 0 = a random start and the goal 1..D moves away, uniformly (short walks: "
                            "--max-moves=6 is the early phase)")
    group.add_argument("--loops", type=float, default=0.0,
                       help="nav: fraction of inner walls knocked out, for several shortest paths")
    group.add_argument("--digits", type=int, default=2, help="arith: longest operand, in digits")
    group.add_argument("--ops", default="+", help="arith: operations to draw from, e.g. '+-*'")
    group.add_argument("--single-token", action="store_true",
                       help="arith: the answer is one token, one per possible result (classification)")
    add_training_flags(parser.add_argument_group("training"))
    add_model_output_and_sweep_flags(parser)
    return parser


def add_training_flags(group):
    group.add_argument("--methods", type=METHODS, default="rloo,grpo,maxrl",
                       help=f"comma-separated, from {', '.join(ESTIMATORS)}, ml (arith only) and "
                            + ", ".join(pattern for pattern, _ in FAMILIES.values()) + " (e.g. maxrl@4)")
    group.add_argument("--N", type=POSITIVE, default=16, help="rollouts per prompt (group size)")
    group.add_argument("--steps", type=NATURAL, default=150, help="RL steps per method")
    group.add_argument("--batch", type=POSITIVE, default=16, help="prompts per RL step")
    group.add_argument("--lr", type=RATE, default=2e-4, help="RL learning rate")
    group.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                       help="RL optimizer: AdamW, or SGD with momentum 0.9 (the paper's classification study; "
                            "no schedule here); the warm start always uses AdamW")
    group.add_argument("--expected-gradient", action="store_true",
                       help="arith: each RL method trains on its estimator's exact expected gradient, "
                            "w_N(p) p grad log p with p teacher-forced: no sampling noise")
    group.add_argument("--sft-steps", type=NATURAL, default=500,
                       help="supervised warm-start steps, shared by all methods (0 = none)")
    group.add_argument("--sft-batch", type=POSITIVE, default=32, help="warm-start batch size")
    group.add_argument("--sft-lr", type=RATE, default=3e-3, help="warm-start learning rate")
    group.add_argument("--seed", type=int, default=0, help="seeds weights, prompts and sampling")
    group.add_argument("--cache-dir", default=str(HERE / "runs" / "cache"),
                       help="where warm-started weights are kept, keyed by every flag they depend on")
    group.add_argument("--no-cache", action="store_true", help="always recompute the warm start")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto = cuda when available")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--cuda-graphs", action="store_true",
                       help="replay sampling's decoding steps from recorded CUDA graphs (GPU only)")
    group.add_argument("--profile", action="store_true",
                       help="with --bench: also print where each path's time goes (torch.profiler)")


def add_model_output_and_sweep_flags(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--n-layer", type=POSITIVE, default=4, help="transformer blocks")
    group.add_argument("--n-head", type=POSITIVE, default=4, help="attention heads")
    group.add_argument("--n-embd", type=POSITIVE, default=96, help="width (divisible by 2 x heads)")
    group = parser.add_argument_group("evaluation and output")
    group.add_argument("--eval-prompts", type=POSITIVE, default=256, help="held-out prompts")
    group.add_argument("--eval-every", type=POSITIVE, default=50, help="evaluate every this many steps")
    group.add_argument("--curve-prompts", type=NATURAL, default=64,
                       help="the evaluations during training: the first this many held-out prompts, each with as "
                            "many samples as the final evaluations (pass@1 and pass@256 along the curve); "
                            "0 = every held-out prompt, the first power of two >= N samples each")
    group.add_argument("--eval-samples", type=NATURAL, default=256,
                       help="samples per held-out prompt in the final evaluations (the warm start's, each method's; "
                            "a power of two, or the next one up)")
    group.add_argument("--out", help="output folder (default runs/<task>-N<N>, or runs/<experiment>)")
    group.add_argument("--overwrite", action="store_true", help="write into an --out that holds a run")
    group.add_argument("--resume", action="store_true",
                       help="compare: continue the interrupted run in --out, from its checkpoint")
    group.add_argument("--ckpt-every", type=NATURAL, default=25,
                       help="compare: checkpoint every this many steps (0 = only on Ctrl-C)")
    group = parser.add_argument_group("sweeps and orders (interpolation, scaling, gradcos, order, variance)")
    group.add_argument("--Ns", type=INTEGERS, default="4,16,64,256", help="rollouts per prompt to sweep, e.g. 4,16")
    group.add_argument("--Ts", type=INTEGERS, default="1,4,16,64,256",
                       help="order: the orders T of maxrl@T to sweep at --N; interpolation: the orders "
                            "trained on their exact expected gradient (maxrl at N = T + 1)")
    group.add_argument("--T", type=POSITIVE, default=4,
                       help="order: the order of maxrl@T at every --Ns; variance: the order compared")
    group.add_argument("--seeds", type=POSITIVE, default=3,
                       help="sweeps and data: seeds SEED..SEED+SEEDS-1, each from its own start")
    group.add_argument("--paper-size", action="store_true",
                       help="scaling: the paper's maze setting (17x17, 3M parameters, N up to 128; a GPU)")


def default_task(args):
    """--task, or nav for the main command and arith for the experiments that need exact p."""
    return args.task or ("arith" if args.experiment in EXACT_P_EXPERIMENTS else "nav")


def flag_problems(args):
    """(is it wrong, what to say) for every check that involves more than one flag."""
    problems = [
        (args.experiment in EXACT_P_EXPERIMENTS and args.task != "arith",
         f"--experiment={args.experiment} needs exact pass rates: use --task=arith"),
        (maxrl.WORLD > 1 and args.experiment != "compare", "torchrun runs the main command (compare) only"),
        (args.batch % maxrl.WORLD or args.sft_batch % maxrl.WORLD,
         f"--batch and --sft-batch must divide among the {maxrl.WORLD} processes"),
        (args.resume and args.overwrite, "--resume and --overwrite exclude each other"),
        (args.resume and args.experiment != "compare", "--resume continues the main command (compare) only"),
        (args.paper_size and args.experiment != "scaling", "--paper-size goes with --experiment=scaling"),
        (args.experiment == "data" and not args.train_pool, "--experiment=data needs a fixed pool: --train-pool >= 1"),
        (args.single_token and args.task != "arith", "--single-token is an arith option"),
        (args.n_embd % (2 * args.n_head), "--n-embd must be a multiple of 2 x --n-head"),
        (args.device == "cuda" and not torch.cuda.is_available(), "--device=cuda but no GPU is visible"),
        (args.cuda_graphs and (args.device == "cpu" or not torch.cuda.is_available()),
         "--cuda-graphs needs a CUDA GPU"),
        (args.cuda_graphs and args.compile, "--cuda-graphs and --compile are exclusive"),
        (args.profile and args.experiment != "bench", "--profile goes with --bench"),
        ("ml" in args.methods and args.task != "arith",
         "ml (exact cross-entropy) needs unique answers: use it with --task=arith"),
        (args.expected_gradient and args.task != "arith",
         "--expected-gradient needs unique answers (exact p): use it with --task=arith"),
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


def memory_problem(args):
    """Why the largest batch of rows this run samples would not fit in memory, or None. Each
    sampled row gets a KV cache of its whole completion up front (2 x layers x width floats a
    token; the prompt's is shared): a lower bound on what sampling allocates, for the RL steps
    (--batch x N rows) and the evaluations (at least one prompt's samples at once)."""
    task, N = args.task_obj, max(args.Ns) if args.experiment in SWEEPS else args.N
    rows = max(args.batch * N, max(final_ks(args, eval_ks(64 if args.experiment in SWEEPS else N))))
    per_row = 4 * task.max_completion_len * (2 * args.n_layer * args.n_embd + len(task.vocab))
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    try:
        total = (torch.cuda.get_device_properties(0).total_memory if cuda
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): no check
        return None
    if rows * per_row > total:
        return (f"sampling {rows:,} rows at once needs at least {rows * per_row / 2**30:,.0f} GiB, more than "
                f"the {total / 2**30:.0f} GiB of {'the GPU' if cuda else 'this machine'}: use a smaller --N or --batch")


def output_problem(args):
    """Why --out cannot be written (or a checkpoint to --resume from cannot be read), or None.
    Made here, before any work, so that the run does not fail at its first checkpoint."""
    checkpoint = args.out / "checkpoint.pt"
    if args.experiment == "bench":  # writes nothing
        return None
    if args.resume:
        if not checkpoint.exists():
            return f"nothing to resume: {checkpoint} does not exist"
        try:
            flags = plumbing.load_checkpoint(checkpoint)["flags"]
        except Exception as err:  # truncated, not a checkpoint, from another version
            return f"cannot read the checkpoint {checkpoint} ({type(err).__name__}: {str(err)[:80]})"
        if flags != plumbing.resumable_flags(args):
            return f"--resume needs the same flags as the run in {args.out}"
    if (not (args.resume or args.overwrite) and maxrl.RANK == 0
            and args.out.is_dir() and any(args.out.iterdir())):
        return f"{args.out} already holds a run: --resume continues it, --overwrite replaces it"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"--out: cannot write to {args.out} ({err.strerror or err})"


def parse_args(argv=None):
    """Parse and check every flag before anything is built or written."""
    parser = build_parser()
    first_pass = parser.parse_known_args(argv)[0]
    parser.set_defaults(**TASK_DEFAULTS.get(default_task(first_pass), {}))
    parser.set_defaults(**EXPERIMENT_DEFAULTS.get(first_pass.experiment, {}))
    if first_pass.experiment == "interpolation" and first_pass.single_token:
        parser.set_defaults(**SINGLE_TOKEN_INTERPOLATION)
    if first_pass.paper_size:
        parser.set_defaults(**PAPER_SIZE)
    args = parser.parse_args(argv)
    args.task = default_task(args)
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
    for check in (memory_problem, output_problem):
        problem = check(args)
        if problem:
            parser.error(problem)
    return args


def run(args):
    """The main command, or the experiment the flags name."""
    if args.experiment == "compare":
        keeper = plumbing.RunKeeper(args, checkpoints=True)
        model, summary = maxrl.compare_methods(args, args.task_obj, keeper)
        if summary and not summary["interrupted"]:
            (args.out / "checkpoint.pt").unlink(missing_ok=True)  # the run is complete
        if summary:
            experiments.analyse_run(summary, args)
        if summary and hasattr(args.task_obj, "path_length") and keeper.run:  # keeper.run holds the warm start
            experiments.walks_figure(model, keeper.trained_weights(), args.task_obj, summary, args.out)
            print(f"wrote {args.out}/walks.png")
    else:
        experiments.EXPERIMENTS[args.experiment](args)


def main(argv=None):
    args = parse_args(argv)
    if maxrl.WORLD > 1:  # launched by torchrun: one process per GPU (nccl) or per CPU slot (gloo)
        on_gpus = args.device != "cpu" and torch.cuda.is_available()
        if on_gpus:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per process, its streams there
        dist.init_process_group("nccl" if on_gpus else "gloo")
    if args.experiment in ("compare", "data", *SWEEPS):  # Ctrl-C: finish the step, save, exit 130
        signal.signal(signal.SIGINT, plumbing.request_stop)
    try:
        run(args)
    except RuntimeError as err:  # train_method's check: the gradient is no longer finite
        if "non-finite" not in str(err):
            raise
        sys.stderr.write(f"error: {err} (a smaller --lr, or another --optimizer?)\n")
        sys.exit(1)
    if maxrl.WORLD > 1:
        dist.destroy_process_group()
    if plumbing.stop_requested:
        sys.exit(130)
