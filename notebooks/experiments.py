"""The paper's experiments, the benchmark, and the checks of the estimators on the real
transformer: what maxrl.py's lesson does not need. Run them from the project root as
    python maxrl.py --experiment=weights          weight function: analytic, exact, measured
    python maxrl.py --experiment=gradnorm         gradient norm against pass rate
    python maxrl.py --experiment=gradcos          cosine to the maximum-likelihood gradient as N grows
    python maxrl.py --experiment=interpolation    maxrl -> cross-entropy as the order grows: each
                                                  order's exact expected gradient, and sampled maxrl
                                                  (--single-token: one-token answers; --optimizer=sgd)
    python maxrl.py --experiment=order            higher order T, or more rollouts N?
    python maxrl.py --experiment=variance         gradient variance at equal order
    python maxrl.py --experiment=scaling          -log pass@k against N on mazes (compute)
    python maxrl.py --experiment=data             a fixed pool of training mazes, many epochs (data)
    python maxrl.py --bench [--profile]           the cached, shared-prefix paths against naive ones
Each writes JSON and a PNG to --out (bench prints). The tests and notebook 02 import the checks.
After the main command, analyse_run prints maxrl's test-time scaling efficiency against each
method (scaling_factors) and, on mazes, pass@k by shortest-path length; it writes analysis.json
and draws curves.png, pass_at_k.png and pareto.png. python notebooks/experiments.py
[--out=DIR] DIR1/results.json DIR2/results.json ... pools runs (pool_runs): the paired comparison
(maxrl.paired_differences), the factors at the largest k and at smaller ones, each one's pass@1
and pass@n with intervals; the pooled figures go to --out (default runs/pooled).
"""

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

if __name__ == "__main__":  # run as a script (pooling results): maxrl.py is one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import maxrl  # noqa: E402
import plumbing  # noqa: E402
import toy_tasks  # noqa: E402

# ----------------------------------------------------------------------------------------
# Checking the estimators on the real model (the tests and --experiment=weights use this).
# A completion "succeeds" when it starts with a target token list; then p = pi(target | x)
# is exact by teacher forcing. With target = answer + <eos> this is arith's verifier.

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
    advantages = maxrl.ESTIMATORS[name](correct[outcomes])  # (M^N, N)
    per_tuple = (advantages[..., None] * score[outcomes]).sum(1) / N  # (M^N, M)
    return (tuple_prob[:, None] * per_tuple).sum(0), probs, score


def target_pass_rate(model, prompt, target):
    """Exact p = pi(target | x), with grad. prompt (Tp,), target: list of ids -> scalar."""
    target_ids = torch.tensor(target, device=prompt.device)[None, None]  # (1, 1, L)
    lengths = torch.tensor([[len(target)]], device=prompt.device)
    return maxrl.completion_logprobs(model, prompt[None], target_ids, lengths)[0, 0].exp()


def flat_grad(scalar, model, retain_graph=False):
    grads = torch.autograd.grad(scalar, list(model.parameters()), retain_graph=retain_graph)
    return torch.cat([g.reshape(-1) for g in grads])  # (n_params,)


def estimator_weighting(name):
    """Coefficients c (G, N) such that sum c_j S_j is the mean over G groups of (1/N) sum_j A_j S_j."""
    return lambda rewards: maxrl.ESTIMATORS[name](rewards) / rewards.numel()


def sampled_gradients(model, prompt, target, N, weightings, n_batches, groups, generator, max_len, stop_id):
    """Monte Carlo gradients for one prompt. Each of n_batches samples `groups` groups of N
    completions; for each weighting fn(rewards (G, N)) -> c (G, N) it records
    sum_gj c_gj grad log pi(z_gj | x). Returns {name: (n_batches, n_params)}."""
    target_ids = torch.tensor(target, device=prompt.device)
    prompts = prompt[None].expand(groups, -1)  # (G, Tp)
    batches = {name: [] for name in weightings}
    for _ in range(n_batches):
        completions, lengths = maxrl.sample_completions(model, prompts, N, max_len, stop_id, generator)
        completions = F.pad(completions, (0, max(0, len(target) - completions.shape[-1])))
        starts_right = (completions[..., :len(target)] == target_ids).all(-1)  # (G, N)
        rewards = (starts_right & (lengths >= len(target))).float()  # (G, N)
        seq_logprob = maxrl.completion_logprobs(model, prompts, completions, lengths)  # (G, N)
        for name, coefficients in weightings.items():
            objective = (coefficients(rewards) * seq_logprob).sum()
            batches[name].append(flat_grad(objective, model, retain_graph=True))
    return {name: torch.stack(grads) for name, grads in batches.items()}

# ----------------------------------------------------------------------------------------
# The experiments: each is one command (--experiment=NAME) that writes JSON and PNG to --out.

def warm_started(args):
    """The model warm-started by these flags (from the cache the main command shares) and its device."""
    keeper = plumbing.RunKeeper(args)
    model, _, device = maxrl.build_model(args, args.task_obj)
    keeper.prepare(model, device)
    keeper.warm_start(model, args.task_obj, args, device)
    return model, device


def new_figure(nrows=1, ncols=1, figsize=(6, 4), **subplot_kw):
    """(fig, axes) as plt.subplots, drawn straight to files: matplotlib's Figure, not pyplot,
    so no display backend is needed and nothing global changes (a notebook keeps its plots)."""
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


def prompts_by_pass_rate(model, task, device):
    """Held-out prompts of a unique-answer task with their exact p, sorted by p."""
    rows = []
    for problem in task.test_problems:
        prompt = maxrl.prompt_tensor(task, [problem], device)[0]
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
    model, device = warm_started(args)
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
    ax.plot(p, maxrl.weight("grpo", p, N), "C1:", lw=2, label=f"weight('grpo', p, N={N})")
    ax.plot(p, maxrl.weight("maxrl", p, N), "C3:", lw=2, label=f"weight('maxrl', p, N={N}): T=N-1")
    ax.plot(p, maxrl.weight("maxrl_order_n", p, N), "C2:", lw=2, label=f"weight('maxrl_order_n', p, N={N}): T=N")
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
    model, device = warm_started(args)
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
            norms[name]["expected"].append(maxrl.weight(name, p, args.N) * grad_p_norm)
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
    model, device = warm_started(args)
    problems = task.test_problems[:args.batch]
    prompts = maxrl.prompt_tensor(task, problems, device)  # (B, Tp)
    p = maxrl.reference_logprob(model, task, problems, prompts).exp()  # (B,) exact, with grad
    ml_grad = flat_grad(p.log().mean(), model, retain_graph=True)
    cosines = {name: {"ml": [], "order_n": []} for name in names}  # [N index][seed]
    for N in tqdm(args.Ns, desc="N"):
        order_n_grad = flat_grad(maxrl_objective(p, N).mean(), model, retain_graph=True)
        for values in cosines.values():
            values["ml"].append([]), values["order_n"].append([])
        for seed in range(args.seeds):
            generator = torch.Generator(device).manual_seed(seed)
            completions, lengths = maxrl.sample_completions(model, prompts, N, task.max_completion_len,
                                                      task.stop_id, generator)  # (B, N, Tc)
            rewards = maxrl.score(task, problems, completions, lengths)  # (B, N)
            seq_logprob = maxrl.completion_logprobs(model, prompts, completions, lengths)  # (B, N)
            for name in names:
                loss = maxrl.policy_gradient_loss(seq_logprob, maxrl.ESTIMATORS[name](rewards))
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
    model, device = warm_started(args)
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
                mean_grad[row] += maxrl.weight(row[0], p, size) * grad_p  # exact E g_x
    table = [{"estimator": row[0], "N": row[1], "order": row[2],
              "relative_variance": variance[row] / mean_grad[row].square().sum().item()} for row in rows]
    print(f"relative variance of one update's gradient ({len(prompts)} prompts, one group each)\n"
          "| estimator | N | order T | relative variance | x N (equal rollouts) |\n|---|---|---|---|---|")
    for r in table:
        print(f"| {r['estimator']} | {r['N']} | {r['order']} | {r['relative_variance']:.3g} "
              f"| {r['relative_variance'] * r['N']:.3g} |")
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"config": maxrl.flag_record(args), "p": [row[0] for row in prompts], "rows": table}
    (args.out / "variance.json").write_text(json.dumps(data, indent=1))
    print(f"wrote {args.out}/variance.json")


def with_flags(args, **changes):
    """A copy of the parsed flags with some changed (one run of a sweep)."""
    return argparse.Namespace(**{**vars(args), **changes})


def train_sweep(args, runs, ks):
    """Train each (method, N) or (method, N, expected) in runs from one shared start per seed
    (seeds --seed .. --seed + --seeds - 1), on the same prompt stream and steps; expected: on the estimator's
    exact expected gradient (--expected-gradient). The engine of the interpolation, order and
    scaling experiments. Returns the start's metrics per seed and {label: [one result per seed]}."""
    task, initial, results = args.task_obj, [], {}
    for seed in range(args.seed, args.seed + args.seeds):
        seed_args = with_flags(args, seed=seed)
        keeper = plumbing.RunKeeper(seed_args)  # the warm start cached, as the main command's
        model, _, device = maxrl.build_model(seed_args, task)
        keeper.prepare(model, device)
        start = maxrl.shared_start(model, task, seed_args, device, ks, keeper)
        initial.append({**start["initial"], "successes": start["successes"]})
        for method, N, expected in [(*run, False)[:3] for run in runs]:
            model.load_state_dict(start["weights"])
            result = maxrl.train_method(method, model, task, with_flags(seed_args, N=N, expected_gradient=expected),
                                        device, start["initial"], ks, keeper)
            results.setdefault(run_label(method, N, expected), []).append(result)
            if plumbing.stop_requested:  # Ctrl-C: keep what is done
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


def run_label(method, N, expected=False):
    return "ml" if method == "ml" else f"{method} T={N - 1} expected" if expected else f"{method} N={N}"


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
    """Does MaxRL interpolate to maximum likelihood as N grows? On arith, where the answer is
    unique and p exact: ml (exact cross-entropy); maxrl trained on its exact expected gradient
    at each order T in --Ts (N = T + 1: w_N(p) p grad log p, no sampling noise: the objective
    alone); maxrl sampled at each N in --Ns (order N - 1: objective and noise); rloo and grpo
    sampled at the largest N. All from one start per seed with the same prompts and steps.
    Left: held-out exact pass@1 and pass@64 against steps (ml, the expected orders, sampled
    maxrl); right: pass@64 at the end against the order T, expected and sampled side by side.
    Mean and range over --seeds seeds."""
    largest, ks = max(args.Ns), maxrl.eval_ks(64)
    runs = ([("ml", largest)] + [("maxrl", T + 1, True) for T in args.Ts] + [("maxrl", N) for N in args.Ns]
            + [(m, largest) for m in ("rloo", "grpo")])
    initial, results = train_sweep(args, runs, ks)
    data = {"config": maxrl.flag_record(args), "Ns": args.Ns, "Ts": args.Ts, "ks": ks, "initial": initial,
            "runs": results}
    if plumbing.stop_requested:
        return save_interrupted_sweep(args.out, "interpolation", data)
    expected = {T: run_label("maxrl", T + 1, True) for T in args.Ts}
    styles = {"ml": {"color": "k", "lw": 2}} | {
        label: {"color": shade(i, len(args.Ts)), "ls": ":"} for i, label in enumerate(expected.values())} | {
        run_label("maxrl", N): {"color": shade(args.Ts.index(N - 1), len(args.Ts)) if N - 1 in args.Ts else "C2"}
        for N in args.Ns}
    fig, axes = new_figure(1, 3, figsize=(16, 4.4))
    for ax, metric in zip(axes, ["pass@1", f"pass@{max(ks)}"]):
        curve_bands(ax, results, metric, styles)
    order_figure(axes[2], results, initial, args, f"pass@{max(ks)}", expected, largest)
    title = f"arith{' single-token' if args.single_token else ''}, {args.optimizer} lr {args.lr}: {args.batch} prompts per step,"
    finish_sweep_figure(fig, axes, args, "interpolation", title, data)


def order_figure(ax, results, initial, args, metric, expected, largest):
    """The end of each run against the order T of its objective: maxrl on its exact expected
    gradient as a line (band: the range over seeds), sampled maxrl at T = N - 1 as squares with
    the range, and ml, rloo, grpo and the start as horizontal lines (means over seeds)."""
    final = lambda label: [r["final"][metric] for r in results[label]]  # one per seed
    band(ax, list(expected), np.array([final(label) for label in expected.values()]).T, color="C0", marker="o",
         label="maxrl, exact expected gradient")
    sampled = np.array([final(run_label("maxrl", N)) for N in args.Ns])  # (Ns, seeds)
    mean = sampled.mean(1)
    ax.errorbar([N - 1 for N in args.Ns], mean, yerr=[mean - sampled.min(1), sampled.max(1) - mean], fmt="s",
                color="C2", capsize=4, label="maxrl sampled at N = T + 1")
    for label, color, ls in [("ml", "k", "-"), (run_label("rloo", largest), "C3", "--"),
                             (run_label("grpo", largest), "C1", "--")]:
        ax.axhline(np.mean(final(label)), color=color, ls=ls, label=label)
    ax.axhline(np.mean([m[metric] for m in initial]), color="grey", ls=":", label="start")
    ax.set(xscale="log", yscale="log", xlabel="order T of the objective (maxrl: T = N - 1)",
           ylabel=f"held-out {metric} at the end (exact)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def order_experiment(args):
    """At equal rollouts, does a higher order help; at equal order, do more rollouts help?
    On single-token arith from scratch (as interpolation): maxrl@T for each T in --Ts at
    N = --N (top row), and maxrl@T at T = --T for each N in --Ns (bottom row), beside ml, all
    from the same start with the same prompts and steps. Held-out exact pass@1 and pass@64
    against steps; mean and range over --seeds seeds."""
    ks = maxrl.eval_ks(64)
    rows = {f"N = {args.N} rollouts, order T varies": [(f"maxrl@{T}", args.N) for T in args.Ts],
            f"order T = {args.T}, rollouts N vary": [(f"maxrl@{args.T}", N) for N in args.Ns]}
    runs = list(dict.fromkeys([("ml", args.N), *itertools.chain(*rows.values())]))  # a run in both: once
    initial, results = train_sweep(args, runs, ks)
    data = {"config": maxrl.flag_record(args), "N": args.N, "Ts": args.Ts, "T": args.T, "Ns": args.Ns,
            "ks": ks, "initial": initial, "runs": results}
    if plumbing.stop_requested:
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
    """The paper's compute-scaling figure at toy scale: each method in --methods at each N in --Ns from the same warm
    start (the main command's: its cache is shared), with the same prompts per step and steps; then -log pass@k on
    the held-out mazes at the end (unbiased, from --eval-samples samples each) against N for k = 1, 16 and the
    largest, the warm start as a line; mean and range over --seeds seeds. Printed, paired and pooled over seeds:
    maxrl minus each at every N, each minus the warm start, and maxrl's gain from the smallest N to the largest
    minus each one's."""
    ks = maxrl.eval_ks(max(args.Ns))
    initial, results = train_sweep(args, [(method, N) for method in args.methods for N in args.Ns], ks)
    n = max(maxrl.final_ks(args, ks))
    shown, reference = sorted({1, min(16, n), n}), reference_method(args.methods)
    data = {"config": maxrl.flag_record(args), "Ns": args.Ns, "ks": ks, "initial": initial, "runs": results}
    if plumbing.stop_requested:
        return save_interrupted_sweep(args.out, "scaling", data)
    data["paired"] = scaling_comparisons(args, initial, results, n, shown, reference)
    fig, axes = new_figure(1, len(shown), figsize=(12, 4))
    for ax, k in zip(axes, shown):
        start = np.mean([m[f"pass@{k}"] for m in initial])
        ax.axhline(-np.log(max(start, 1e-4)), color="k", ls=":", label="warm start")
        for method in args.methods:
            per_seed = [[r["final"][f"pass@{k}"] for r in results[run_label(method, N)]] for N in args.Ns]
            band(ax, args.Ns, -np.log(np.maximum(per_seed, 1e-4)).T, marker="o", label=method)  # (seeds, Ns)
        ax.set(xscale="log", xlabel="rollouts per prompt N", title=f"-log pass@{k} (held out; lower is better)")
        ax.set_xticks(args.Ns, [str(N) for N in args.Ns])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
    title = f"nav {args.size}x{args.size}: {args.steps} steps x {args.batch} prompts, {n} samples per held-out maze;"
    finish_sweep_figure(fig, axes, args, "scaling", title, data)


def reference_method(methods):
    """The method the others are compared with: maxrl if it ran, else the last (as maxrl.success_table)."""
    return "maxrl" if "maxrl" in methods else methods[-1]


def scaling_comparisons(args, initial, results, n, ks, reference):
    """The scaling experiment's paired tables (printed, and returned for its JSON): at each N, reference minus each
    method and each method minus the warm start; and reference's gain in pass@k from the smallest N to the largest
    minus each method's. Intervals: maxrl.mean_interval over the held-out prompts of every seed."""
    successes = lambda method, N: [r["per_prompt_successes"] for r in results[run_label(method, N)]]
    per_prompt = lambda counts, k: maxrl.pass_at_k(n, np.asarray(counts, dtype=np.float64), k)  # (P,)
    low, high = min(args.Ns), max(args.Ns)
    gain_title = f"reference's gain from N = {low} to N = {high} minus each one's"
    tables = {"reference minus each": {}, "each minus the warm start": {}, gain_title: {}}
    for N in args.Ns:
        runs = [{"start": start["successes"]} | {m: successes(m, N)[seed] for m in args.methods}
                for seed, start in enumerate(initial)]
        tables["reference minus each"][N] = maxrl.paired_differences(runs, n, ks, reference)
        tables["each minus the warm start"][N] = {m: maxrl.paired_differences(runs, n, ks, m)["start"]
                                                  for m in args.methods}
    gain = lambda method, seed, k: (per_prompt(successes(method, high)[seed], k)
                                    - per_prompt(successes(method, low)[seed], k))  # (P,)
    tables[gain_title] = {f"{low}->{high}": {method: {f"pass@{k}": maxrl.mean_interval(
        [gain(reference, seed, k) - gain(method, seed, k) for seed in range(len(initial))]) for k in ks}
        for method in args.methods if method != reference}} if low < high else {}  # one N: no gain
    for title, table in [(title, table) for title, table in tables.items() if table]:
        print(f"\n{title.replace('reference', reference)} (mean, 95% paired bootstrap interval, {len(initial)} seeds):")
        for N, rows in table.items():
            for name, row in rows.items():
                print(f"N={N:<7} {name:>6} " + "  ".join(f"{m} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                                                          for m, (d, lo, hi) in row.items() if m != "coverage"))
    return tables


def data_comparisons(points, epochs, n, held_out, reference):
    """The data-scarce experiment's paired tables (printed, and returned for its JSON): reference minus each method
    at the end (every held-out maze) and at the evaluation where that method's held-out pass@1 (held_out, mean over
    seeds) peaks. points: {method: per seed, the per-prompt success counts at each evaluation (the warm start's
    first); epochs: the epoch of each evaluation."""
    tables = {"at the end": {}, "at its peak": {}}
    for method in [m for m in points if m != reference]:
        peak = 1 + int(np.argmax(np.mean([[held_out(c, 1) for c in seed[1:]] for seed in points[method]], 0)))
        for title, at in [("at the end", -1), ("at its peak", peak)]:
            runs = [{reference: ours[at], method: theirs[at]}
                    for ours, theirs in zip(points[reference], points[method])]
            tables[title][method] = {"epoch": epochs[at],
                                     **maxrl.paired_differences(runs, n, [1, n], reference)[method]}
    for title, table in tables.items():
        print(f"\n{reference} minus each, {title} (epoch; mean, 95% paired bootstrap interval over the "
              f"held-out mazes of {len(points[reference])} seeds):")
        for name, row in table.items():
            print(f"{name:>6} epoch {row['epoch']:<5g} " + "  ".join(f"{m} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                                                             for m, (d, lo, hi) in list(row.items())[1:]))
    return tables


def data_experiment(args):
    """The paper's data-scarce study at toy scale: RL on a fixed pool of --train-pool training mazes, epoch after
    epoch, each method in --methods from the same warm start (trained on fresh mazes, as pretraining is: the main
    command's cache). Against epochs: the training reward on the pool, held-out pass@1 and pass@n (n samples, the
    first --curve-prompts held-out mazes at every point), the warm start as a line; mean and range over --seeds
    seeds. Printed, paired and pooled over seeds: maxrl minus each at the end (every held-out maze) and where each
    other method's held-out pass@1 peaks."""
    ks = maxrl.eval_ks(args.N)
    initial, results = train_sweep(args, [(method, args.N) for method in args.methods], ks)
    data = {"config": maxrl.flag_record(args), "ks": ks, "initial": initial, "runs": results}
    if plumbing.stop_requested:
        return save_interrupted_sweep(args.out, "data", data)
    n, reference = max(maxrl.final_ks(args, ks)), reference_method(args.methods)
    points = {method: [[start["successes"], *[c["successes"] for c in r["curve"][1:]]]  # per seed: per point
                       for r, start in zip(results[run_label(method, args.N)], initial)] for method in args.methods}
    shown = args.curve_prompts or len(initial[0]["successes"])  # the mazes every point has
    held_out = lambda counts, k: np.mean(maxrl.pass_at_k(n, np.asarray(counts[:shown], dtype=np.float64), k))
    epochs = [c["step"] * args.batch / args.train_pool for c in results[run_label(reference, args.N)][0]["curve"]]
    data["paired"] = data_comparisons(points, epochs, n, held_out, reference)
    fig, axes = new_figure(1, 3, figsize=(15, 4))
    for method in args.methods:
        per_seed = results[run_label(method, args.N)]
        band(axes[0], epochs[1:], [[c["train_reward"] for c in r["curve"][1:]] for r in per_seed], label=method)
        for ax, k in zip(axes[1:], [1, n]):
            band(ax, epochs, [[held_out(counts, k) for counts in seed] for seed in points[method]], marker=".",
                 label=method)
    for ax, k in zip(axes[1:], [1, n]):
        ax.axhline(np.mean([held_out(m["successes"], k) for m in initial]), color="k", ls="--", label="warm start")
        ax.set(ylabel=f"held-out pass@{k} ({shown} mazes)")
    axes[0].set(ylabel=f"training reward (pass@1 on the pool of {args.train_pool})")
    for ax in axes:
        ax.set(xlabel="epochs over the pool")
        ax.grid(alpha=0.3)
    title = (f"nav {args.size}x{args.size}: {args.train_pool} training mazes, {args.steps} steps x {args.batch} "
             f"prompts x N = {args.N};")
    finish_sweep_figure(fig, axes[1:], args, "data", title, data)


# ----------------------------------------------------------------------------------------
# After the main command: each method against maxrl on the same held-out prompts, with a
# bootstrap interval, and on which prompts (by shortest-path length, for mazes) it happens.

def samples_to_reach(curve, target):
    """The k at which an increasing curve pass@1..pass@K first reaches target, interpolated
    linearly in log k between the integers around it; 1 if pass@1 already does. curve (K,)."""
    i = int(np.argmax(curve >= target))  # the first k = i + 1 that reaches it (curve[-1] >= target)
    if i == 0:
        return 1.0
    fraction = (target - curve[i - 1]) / (curve[i] - curve[i - 1])
    return i * ((i + 1) / i) ** fraction  # log k* = log i + fraction (log(i + 1) - log i)


def scaling_factor(ours, theirs):
    """Test-time scaling efficiency of ours against theirs, two pass@k curves (k = 1..K): how many
    times fewer samples ours needs for the same pass@k, anchored at the largest k. If ours reaches
    theirs's pass@K at k < K, K / k (above 1); else theirs reaches our pass@K at some k', and k' / K."""
    K = len(ours)
    return K / samples_to_reach(ours, theirs[-1]) if ours[-1] >= theirs[-1] else samples_to_reach(theirs, ours[-1]) / K


def bootstrap_curves(runs, n, resamples=2000, seed=0):
    """The pass@k curves (k = 1..n, unbiased from n samples per prompt) of each name, averaged over prompts and
    over runs (runs: one {name: per-prompt success counts} per run, the same prompts for every name), and
    `resamples` bootstrap copies of them (maxrl.bootstrap: the same draws for every name, paired).
    Returns {name: (n,)} and {name: (resamples, n)}."""
    per_prompt = lambda c: 1 - maxrl.all_fail_fractions(n, np.asarray(c, dtype=np.float64), n)[:, 1:]  # (P, n)
    curves = {name: maxrl.bootstrap([per_prompt(successes[name]) for successes in runs], resamples, seed)
              for name in runs[0]}
    return {name: curve for name, (curve, _) in curves.items()}, {name: copies for name, (_, copies) in curves.items()}


def scaling_factors(curves, boots, reference="maxrl", at=None):
    """{name: [factor, low, high]}: scaling_factor of reference against each other name (curves and
    boots from bootstrap_curves), anchored at k = at (default: the largest k), and its 95% bootstrap
    interval (paired: the same prompts resampled)."""
    return {name: [scaling_factor(curves[reference][:at], curves[name][:at]), *np.percentile(
        [scaling_factor(ours[:at], theirs[:at]) for ours, theirs in zip(boots[reference], boots[name])],
        [2.5, 97.5]).tolist()] for name in curves if name != reference}


def with_intervals(curves, boots, k):
    """{name: [pass@k, low, high]}: each name's own 95% bootstrap interval (not paired)."""
    return {name: [float(curve[k - 1]), *np.percentile(boots[name][:, k - 1], [2.5, 97.5]).tolist()]
            for name, curve in curves.items()}


def lowest_differences(curves, boots, reference="maxrl"):
    """{name: [k, difference, low, high]}: where reference's pass@k curve is lowest against each other name's
    (curves and boots from bootstrap_curves), the difference there and its 95% paired bootstrap interval:
    a lowest difference at or above zero means reference is at least as good at every k."""
    lowest = {}
    for name in [name for name in curves if name != reference]:
        k = int(np.argmin(curves[reference] - curves[name]))
        lowest[name] = [k + 1, float(curves[reference][k] - curves[name][k]),
                        *np.percentile(boots[reference][:, k] - boots[name][:, k], [2.5, 97.5]).tolist()]
    return lowest


def print_scaling_factors(factors, reference, n):
    print(f"\ntest-time scaling efficiency of {reference} at k = {n}: how many times fewer samples it needs for the "
          "same pass@k (below 1: more), 95% bootstrap interval over prompts")
    for name, (factor, low, high) in factors.items():
        print(f"{name:>13} {factor:.2f}x [{low:.2f}, {high:.2f}]")


def curves_figure(summaries, out, pooled=""):
    """curves.png: held-out pass@1 and pass@(the largest k every evaluation has) against rollouts, each method's
    mean over runs (summaries: one or several results.json of the same flags) as a line, min..max as a band;
    the warm start's as a dashed line."""
    points = [point for summary in summaries for r in summary["methods"].values() for point in r["curve"]]
    largest = max(int(key[5:]) for key in set.intersection(*[set(point) for point in points]) if key.startswith("pass@"))
    fig, axes = new_figure(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ["pass@1", f"pass@{largest}"]):
        ax.axhline(np.mean([summary["initial"][metric] for summary in summaries]), color="k", ls="--", label="start")
        for method, r in summaries[0]["methods"].items():
            band(ax, [c["rollouts"] for c in r["curve"]],
                 [[c[metric] for c in summary["methods"][method]["curve"]] for summary in summaries], marker=".", label=method)
        ax.set(xlabel="rollouts consumed (steps x prompts x N)", ylabel=f"held-out {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{pooled}mean over runs, band: min..max" if len(summaries) > 1 else "", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)


def pass_at_k_figure(curves, factors, reference, out, pooled=""):
    """pass_at_k.png: pass@k against log k at the end, as the paper's figure; each factor drawn as the
    span from where one curve reaches the other's pass@n to n."""
    fig, ax = new_figure(figsize=(6.5, 4.5))
    n, ks = len(curves[reference]), np.arange(1, len(curves[reference]) + 1)
    lines = {name: ax.plot(ks, curve, "k--" if name == "start" else "-", label=name)[0]
             for name, curve in curves.items()}
    for name, (factor, _, _) in factors.items():
        behind = curves[name] if factor >= 1 else curves[reference]  # the curve whose pass@n the other reaches
        k_reached = n / factor if factor >= 1 else n * factor
        ax.plot([k_reached, n], [behind[-1]] * 2, ":", color=lines[name].get_color(), lw=2)
        ax.annotate(f"{factor:.2g}x", (k_reached, behind[-1]), textcoords="offset points", xytext=(-4, 4),
                    ha="right", fontsize=8, color=lines[name].get_color())
    ticks = [2**i for i in range(n.bit_length())]
    ax.set(xscale="log", xlabel="k (samples per prompt)", ylabel="held-out pass@k", xticks=ticks,
           xticklabels=[str(k) for k in ticks], title=f"{pooled}{reference}'s samples for the same pass@{n} (dotted)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pass_at_k.png", dpi=120)


def pareto_figure(curves, boots, out, pooled=""):
    """pareto.png: pass@1 against pass@n per name, each with its own 95% bootstrap interval."""
    n, fig, ax = len(next(iter(curves.values()))), *new_figure(figsize=(5.5, 4.5))
    low, high = with_intervals(curves, boots, 1), with_intervals(curves, boots, n)
    for name in curves:
        (y, y_lo, y_hi), (x, x_lo, x_hi) = low[name], high[name]
        ax.errorbar(x, y, xerr=[[x - x_lo], [x_hi - x]], yerr=[[y - y_lo], [y_hi - y]], fmt="ks" if name == "start"
                    else "o", capsize=3, label=name)
    ax.set(xlabel=f"held-out pass@{n}", ylabel="held-out pass@1")
    ax.set_title(f"{pooled}up and right is better\nbars: each one's own 95% interval (paired differences: tighter)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)


def test_time_scaling(runs, reference, n, out, pooled=""):
    """The factors of reference against each name over runs (one or several), printed and drawn in
    out/pass_at_k.png beside out/pareto.png. Returns the curves, their bootstrap copies and the factors."""
    curves, boots = bootstrap_curves(runs, n)
    factors = scaling_factors(curves, boots, reference)
    print_scaling_factors(factors, reference, n)
    out.mkdir(parents=True, exist_ok=True)
    pass_at_k_figure(curves, factors, reference, out, pooled)
    pareto_figure(curves, boots, out, pooled)
    return curves, boots, factors


def analyse_run(summary, args):
    """After the main command: maxrl's test-time scaling factors against each, pass@1 and pass@n with intervals and,
    on mazes, pass@n by path length (printed, and --out/analysis.json); the figures."""
    successes, reference = maxrl.success_table(summary)
    n = summary["samples_per_prompt"]
    curves, boots, factors = test_time_scaling([successes], reference, n, args.out)
    analysis = {"reference": reference, "scaling_factors": factors,  # the paired table is in results.json
                "pass@1": with_intervals(curves, boots, 1), f"pass@{n}": with_intervals(curves, boots, n)}
    curves_figure([summary], args.out)
    if hasattr(args.task_obj, "path_length"):
        analysis |= by_path_length_report(summary, successes, args.task_obj)
    (args.out / "analysis.json").write_text(json.dumps(analysis, indent=1))
    print(f"wrote {args.out}/analysis.json, curves.png, pass_at_k.png, pareto.png")


def length_bins(lengths):
    """{label: mask} for the bins of shortest-path length (moves) that hold mazes."""
    lengths, edges = np.asarray(lengths), [1, 3, 5, 7, 10, 14, 18, 10**9]
    bins = {f"{lo}-{hi - 1}" if hi < 10**9 else f"{lo}+": (lengths >= lo) & (lengths < hi)
            for lo, hi in zip(edges, edges[1:])}
    return {label: mask for label, mask in bins.items() if mask.any()}


def by_path_length(successes, lengths, n, k):
    """{name: {bin: mean pass@k over the mazes of that bin of shortest-path length}}."""
    bins = length_bins(lengths)
    return {name: {label: float(maxrl.pass_at_k(n, np.asarray(c, dtype=np.float64), k)[mask].mean())
                   for label, mask in bins.items()} for name, c in successes.items()}


def pass_rate_histogram(successes, lengths, n):
    """The warm start's spread: {bin of path length, and "all": {successes out of n: mazes}} with
    the classes 0, 1, 2-3, 4-7, ... up to n."""
    c, edges = np.asarray(successes), [0, 1] + [2**i for i in range(1, n.bit_length())] + [n, n + 1]
    edges = sorted(set(edges))
    classes = {(f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}"): (c >= lo) & (c < hi)
               for lo, hi in zip(edges, edges[1:])}
    rows = length_bins(lengths) | {"all": np.ones(len(c), dtype=bool)}
    return {row: {label: int((members & mask).sum()) for label, members in classes.items()}
            for row, mask in rows.items()}


def by_path_length_report(summary, successes, task):
    """After the main command on mazes: print pass@n by shortest-path length and the warm start's
    pass-rate histogram; returns both, for analysis.json."""
    n, analysis = summary["samples_per_prompt"], {}
    lengths = [task.path_length(problem) for problem in task.test_problems]
    analysis["by_path_length"] = by_path_length(successes, lengths, n, n)
    analysis["start_pass_rate_histogram"] = pass_rate_histogram(successes["start"], lengths, n)
    print(f"\npass@{n} by shortest-path length, moves (mazes: "
          + ", ".join(f"{label} {int(mask.sum())}" for label, mask in length_bins(lengths).items()) + ")")
    for name, row in analysis["by_path_length"].items():
        print(f"{name:>13} " + " ".join(f"{label:>6} {value:.3f}" for label, value in row.items()))
    initial = summary["initial"]
    if "route_token_accuracy" in initial:  # reading the maze, move by move, against walking it whole
        print(f"\nwarm start, teacher-forced on each held-out maze's shortest route: "
              f"{initial['route_token_accuracy']:.1%} of its moves ranked first, "
              f"the whole route's probability {initial['route_prob']:.3f} on average (pass@1 {initial['pass@1']:.3f})")
    print(f"\nwarm start: held-out mazes by successes out of {n}, by path length")
    for row, classes in analysis["start_pass_rate_histogram"].items():
        print(f"{row:>13} " + " ".join(f"{label}: {count:<4}" for label, count in classes.items()))
    return analysis


def walk_squares(start, moves):
    """The squares a walk visits, (row, col) from the start, for the move names in `moves` (DONE ends it)."""
    squares = [start]
    for move in moves:
        if move not in toy_tasks.MOVES:
            break
        squares.append((squares[-1][0] + toy_tasks.MOVES[move][0], squares[-1][1] + toy_tasks.MOVES[move][1]))
    return squares


@torch.no_grad()
def walks_figure(model, weights, task, summary, out, n_walks=64, seed=0):
    """walks.png: one held-out maze, n_walks walks sampled from each of `weights` ({name: state dict}, the warm
    start first) drawn over it: green reached the goal, red failed (a red walk ends where its reward was
    decided: mostly the wall it walked into). A run continued with --resume draws only the methods it
    trained itself. The maze is chosen by the warm start alone (its success counts in summary, results.json): the one it
    solves closest to one time in eight, the longer route first among equals; so the methods start from a
    maze that is neither solved nor hopeless, and sharpening (few distinct walks) and coverage (many) show."""
    lengths = [task.path_length(problem) for problem in task.test_problems]
    successes, n = summary["initial_per_prompt_successes"], summary["samples_per_prompt"]
    index = min(range(len(lengths)), key=lambda i: (abs(successes[i] / n - 1 / 8), -lengths[i]))
    problem = task.test_problems[index]
    grid, start, goal = problem
    prompts = maxrl.prompt_tensor(task, [problem], model.embed.weight.device)
    fig, axes = new_figure(1, len(weights), figsize=(2.6 * len(weights), 3.0))
    for ax, (name, state) in zip(np.atleast_1d(axes), weights.items()):
        model.load_state_dict(state)
        generator = torch.Generator(prompts.device).manual_seed(seed)
        completions, ends = maxrl.sample_completions(model, prompts, n_walks, task.max_completion_len, task.stop_id,
                                                     generator, task.reward_tracker([problem], n_walks, prompts.device))
        rewards = maxrl.score(task, [problem], completions, ends)[0]  # (n_walks,)
        walks = [tuple(task.decode(c[:end])) for c, end in zip(completions[0].tolist(), ends[0].tolist())]
        ax.imshow(np.array(grid, dtype=float), cmap="gray", vmin=-0.3, vmax=1.0)
        rng = np.random.default_rng(seed)
        for walk, reward in zip(walks, rewards.tolist()):
            rows, cols = np.array(walk_squares(start, walk), dtype=float).T + rng.normal(0, 0.08, (2, 1))
            ax.plot(cols, rows, color="tab:green" if reward else "tab:red", alpha=0.25, lw=1.2)
        ax.plot(*start[::-1], "bo", ms=5)
        ax.plot(*goal[::-1], "b*", ms=9)
        ax.set_title(f"{name}: {int(rewards.sum())}/{n_walks} reach the goal\n{len(set(walks))} distinct walks", fontsize=8)
        ax.set(xticks=[], yticks=[])
    fig.suptitle(f"one held-out maze (shortest route {lengths[index]} moves), {n_walks} sampled walks each", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "walks.png", dpi=120)


# ----------------------------------------------------------------------------------------
# The benchmark (--bench): the fast paths against naive ones, in the same run.

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


def with_plain_cache(model, fn):
    """fn, run with the lesson's KV cache (each prompt's keys copied into its rows) in place of the keeper's."""
    def run():
        keepers_cache, model.kv_cache = model.kv_cache, maxrl.KVCache
        fn()
        model.kv_cache = keepers_cache
    return run


def benchmark(args, repeats=3):
    """--bench: the cached, shared-prefix paths against naive ones, in the same run. Sampling: the KV cache with each
    prompt's keys stored once for its rows (the command line's decoder: on a CPU ended rows leave the batch; the
    lesson's decoder, every row to the end; that one with the lesson's cache, the prompt copied into each row) vs
    recomputing every sequence at every step. Training step (forward + backward): shared prefix (and the lesson's
    cache) vs full sequences. The model is freshly initialised (no warm start; its completions
    are random, about 15 tokens on nav): this measures the cost of each path, not of a policy."""
    task = args.task_obj
    model, _, device = maxrl.build_model(args, task)
    lesson_decoder = model.decoder
    plumbing.RunKeeper(args).prepare(model, device)
    prompts = maxrl.prompt_tensor(task, task.sample_train(args.batch, random.Random(args.seed)), device)

    def sample(decoder=None):
        generator = torch.Generator(device).manual_seed(args.seed)
        return maxrl.sample_completions(model, prompts, args.N, task.max_completion_len, task.stop_id,
                                        generator, decoder=decoder)

    completions, lengths = sample()  # (B, N, Tc), (B, N); also warms up
    rewards = torch.randint(0, 2, lengths.shape, device=device).float()  # (B, N)

    def train_step(logprob_fn):
        model.zero_grad(set_to_none=True)
        loss = maxrl.policy_gradient_loss(logprob_fn(model, prompts, completions, lengths), maxrl.maxrl(rewards))
        loss.backward()

    train_step(maxrl.completion_logprobs)  # warm-up
    n_tokens = lengths.sum().item()
    paths = {"sampling, no cache": lambda: sample(plumbing.CompactingDecoder(model, recompute=True)),
             "sampling, cached": sample, "sampling, cached, masked": lambda: sample(lesson_decoder),
             "sampling, lesson's cache, masked": with_plain_cache(model, lambda: sample(lesson_decoder)),
             "train step, full sequences": lambda: train_step(full_sequence_logprobs),
             "train step, shared prefix": lambda: train_step(maxrl.completion_logprobs),
             "train step, lesson's cache": with_plain_cache(model, lambda: train_step(maxrl.completion_logprobs))}
    seconds = {name: median_seconds(fn, device, repeats) for name, fn in paths.items()}
    if args.profile:
        for name, fn in paths.items():
            print_profile(name, fn, device)
    print(f"{args.batch} prompts x N={args.N} completions of {lengths.float().mean():.1f} tokens, "
          f"prompt {task.prompt_len} tokens; median of {repeats} repeats")
    for name, sec in seconds.items():
        print(f"  {name:<32} {sec * 1e3:9.1f} ms   {n_tokens / sec:12,.0f} completion tokens/s")
    sampling = seconds["sampling, no cache"] / seconds["sampling, cached"]
    training = seconds["train step, full sequences"] / seconds["train step, shared prefix"]
    print(f"bench: sampling {sampling:.1f}x, training {training:.1f}x")


EXPERIMENTS = {"weights": weights_experiment, "gradnorm": gradnorm_experiment, "gradcos": gradcos_experiment,
               "variance": variance_experiment, "interpolation": interpolation_experiment,
               "order": order_experiment, "scaling": scaling_experiment, "data": data_experiment,
               "bench": benchmark}


def pool_runs(paths, out):
    """Pool main-command runs (results.json of the same flags, other seeds): print the paired comparison and
    the scaling factors pooled over them, each name's pass@1 and pass@n with intervals; out: the figures."""
    summaries = [json.loads(Path(path).read_text()) for path in paths]
    runs = [maxrl.success_table(summary) for summary in summaries]
    (_, reference), ns = runs[0], {summary["samples_per_prompt"] for summary in summaries}
    if len(ns) > 1:
        sys.exit(f"error: the runs have different samples per prompt ({sorted(ns)}): pool runs with the same flags")
    pooled, N, n = [successes for successes, _ in runs], summaries[0]["N"], ns.pop()
    table = maxrl.paired_differences(pooled, n, sorted({1, max(maxrl.eval_ks(N)), n}), reference)
    maxrl.print_paired(table, reference, f"pooled over {len(runs)} runs (the mean of the runs' means; the interval "
                       "resamples prompts within each run)")
    curves, boots, _ = test_time_scaling(pooled, reference, n, out, pooled=f"pooled over {len(runs)} runs: ")
    print("\nthe same, anchored at smaller k (the paper reads its factors at k up to 512-4096):")
    for k in [2**i for i in range(4, n.bit_length() - 1)]:
        print(f"{'k = ' + str(k):>13} " + "  ".join(f"{name} {factor:.2f}x [{low:.2f}, {high:.2f}]" for name, (
            factor, low, high) in scaling_factors(curves, boots, reference, at=k).items()))
    print(f"\n{reference} minus each at every k = 1..{n}, paired: the lowest difference, at that k")
    for name, (k, difference, low, high) in lowest_differences(curves, boots, reference).items():
        print(f"{name:>13} pass@{k} {difference:+.3f} [{low:+.3f}, {high:+.3f}]")
    for k in (1, n):
        print(f"\npass@{k}, each with its own 95% interval: " + ", ".join(
            f"{name} {v:.3f} [{lo:.3f}, {hi:.3f}]" for name, (v, lo, hi) in with_intervals(curves, boots, k).items()))
    curves_figure(summaries, out, pooled=f"pooled over {len(runs)} runs: ")
    print(f"\nwrote {out}/pass_at_k.png, pareto.png, curves.png")


if __name__ == "__main__":  # python notebooks/experiments.py [--out DIR] runs/nav-N16-seed*/results.json
    parser = argparse.ArgumentParser(description="Pool main-command runs: paired differences, scaling factors.")
    parser.add_argument("results", nargs="+", help="results.json files of runs with the same flags")
    parser.add_argument("--out", type=Path, default=Path("runs/pooled"), help="where the pooled figures go")
    pooling = parser.parse_args()
    pool_runs(pooling.results, pooling.out)
