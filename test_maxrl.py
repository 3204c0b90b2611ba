"""Tests for maxrl.py and toy_tasks.py. Run with `pytest` (about a minute on 2 CPU cores)."""

import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import maxrl
from maxrl import ESTIMATORS, pass_at_k, weight
from toy_tasks import Arithmetic, Navigation, prim_maze, shortest_path

HERE = Path(__file__).parent


# ---------------------------------------------------------------- estimators: shapes and edges

@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("shape", [(8,), (3, 8), (2, 3, 8)])
def test_advantage_shape(name, shape):
    rewards = torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(0)).float()
    assert ESTIMATORS[name](rewards).shape == shape


@pytest.mark.parametrize("name", ESTIMATORS)
def test_all_success_and_all_fail_groups(name):
    N = 6
    all_fail, all_success = ESTIMATORS[name](torch.zeros(N)), ESTIMATORS[name](torch.ones(N))
    expected_fail = -1.0 if name == "maxrl_order_n" else 0.0  # the kept control variate
    expected_success = 1.0 if name == "reinforce" else 0.0
    assert torch.equal(all_fail, torch.full((N,), expected_fail))
    assert torch.allclose(all_success, torch.full((N,), expected_success))


def test_maxrl_is_n_over_k_minus_one():
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0])  # N = 8, K = 2
    assert torch.allclose(ESTIMATORS["maxrl"](rewards), rewards * 8 / 2 - 1)
    assert torch.allclose(ESTIMATORS["maxrl_order_n"](rewards), rewards * 8 / 2 - 1)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_single_sample_groups(name):
    """N = 1: rloo refuses; maxrl gives no signal; nothing returns NaN or inf (no r / 1e-6)."""
    for reward in (0.0, 1.0):
        rewards = torch.tensor([[reward]])
        if name == "rloo":
            with pytest.raises(ValueError, match="N >= 2"):
                ESTIMATORS[name](rewards)
            continue
        advantages = ESTIMATORS[name](rewards)
        assert torch.isfinite(advantages).all()
        if name in ("maxrl", "grpo"):
            assert advantages.abs().max() == 0


@pytest.mark.parametrize("name", ESTIMATORS)
def test_statistics_are_per_group_not_per_batch(name):
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    row_by_row = torch.stack([ESTIMATORS[name](row) for row in rewards])
    assert torch.allclose(ESTIMATORS[name](rewards), row_by_row)
    # and the batch's composition does not matter: a group alone gets the same advantages
    assert torch.allclose(ESTIMATORS[name](rewards[:1]), row_by_row[:1])


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, float("nan")])
def test_non_binary_rewards_are_refused(name, bad):
    with pytest.raises(ValueError, match="binary"):
        ESTIMATORS[name](torch.tensor([1.0, 0.0, bad, 1.0]))


def test_loss_is_sequence_sum_over_n_then_prompt_mean():
    seq_logprob = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    loss = maxrl.policy_gradient_loss(seq_logprob, advantages)
    assert loss.item() == pytest.approx(-((-1 + 2) / 2 + (-6) / 2) / 2)
    loss.backward()
    assert torch.allclose(seq_logprob.grad, -advantages / 2 / 2)  # d/d logprob = -A / N / B


# ---------------------------------------------------------------- pass@k

@pytest.mark.parametrize("n", [1, 5, 16, 40])
def test_pass_at_k_matches_math_comb(n):
    for c, k in itertools.product(range(n + 1), range(1, n + 1)):
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    all_c = np.arange(n + 1)
    assert np.allclose(pass_at_k(n, all_c, 1), all_c / n)  # vectorised over c


def test_pass_at_k_refuses_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


# ---------------------------------------------------------------- tasks and verifiers

def test_arith_verifier():
    task = Arithmetic(digits=3, ops="+-*", n_test=8)
    problem = (47, "+", 128)
    assert task.encode_prompt(problem) == [task.bos_id] + task.encode("047+128=")
    right = task.encode("175") + [task.eos_id]
    assert task.check(problem, right) == (True, "correct")
    assert task.reward(problem, task.encode("176") + [task.eos_id]) == 0
    assert task.reward(problem, task.encode("175")) == 0  # no <eos>
    assert task.reward(problem, task.encode("1750") + [task.eos_id]) == 0
    assert task.reward((3, "-", 9), task.encode("-6") + [task.eos_id]) == 1
    assert task.reward((12, "*", 34), task.reference_completion((12, "*", 34))) == 1


def tiny_maze():
    """5x5, open border on the right of row 1 so that leaving the grid can be tested."""
    rows = ["#####",
            "#...." ,
            "###.#",
            "#...#",
            "#####"]
    grid = tuple(tuple(ch == "." for ch in row) for row in rows)
    return (grid, (1, 1), (3, 1))


@pytest.mark.parametrize("moves, ok, reason", [
    ("RIGHT RIGHT DOWN DOWN LEFT LEFT DONE", True, "correct"),
    ("RIGHT LEFT RIGHT RIGHT DOWN DOWN LEFT LEFT DONE", True, "correct"),  # revisits allowed
    ("DOWN DONE", False, "wall"),
    ("RIGHT RIGHT RIGHT RIGHT DONE", False, "left the grid"),
    ("RIGHT RIGHT DOWN DOWN LEFT LEFT", False, "no DONE"),
    ("RIGHT RIGHT DOWN DOWN LEFT LEFT RIGHT DONE", False, "goal reached"),
    ("RIGHT RIGHT DOWN DOWN LEFT LEFT UP", False, "goal reached"),
    ("RIGHT WALL DONE", False, "not a move"),
    ("RIGHT DONE", False, "DONE before the goal"),
])
def test_nav_verifier(moves, ok, reason):
    task = Navigation(size=5, n_test=2)
    passed, why = task.check(tiny_maze(), task.encode(moves.split()))
    assert passed == ok and reason in why


def test_mazes_are_solvable_and_bfs_paths_pass():
    for size, loops in [(5, 0.0), (7, 0.0), (9, 0.3), (17, 0.0)]:
        task = Navigation(size=size, loops=loops, n_test=2)
        rng = random.Random(size)
        for problem in task.sample_train(30, rng):
            grid = problem[0]
            open_squares = {(r, c) for r in range(size) for c in range(size) if grid[r][c]}
            for square in open_squares:  # every open square is reachable from every other
                assert shortest_path(grid, problem[1], square) or square == problem[1]
            assert task.reward(problem, task.reference_completion(problem)) == 1
            assert len(task.encode_prompt(problem)) == task.prompt_len
            assert len(task.reference_completion(problem)) <= task.max_completion_len


def test_loops_make_several_shortest_paths_possible():
    rng = random.Random(0)
    perfect = prim_maze(9, rng)
    looped = prim_maze(9, rng, loops=0.5)
    n_open = lambda g: sum(map(sum, g))
    assert n_open(perfect) == 4 * 4 + 4 * 4 - 1  # a tree over the 16 cells
    assert n_open(looped) > n_open(perfect)


@pytest.mark.parametrize("task", [Navigation(size=7, n_test=64), Arithmetic(digits=2, n_test=64)])
def test_train_and_test_splits_are_disjoint(task):
    test_keys = {task.key(p) for p in task.test_problems}
    assert len(test_keys) == len(task.test_problems)  # held-out problems are distinct
    train = task.sample_train(3000, random.Random(1))
    assert not test_keys & {task.key(p) for p in train}


def test_impossible_task_settings_are_refused():
    for make in [lambda: Navigation(size=6), lambda: Navigation(size=3),
                 lambda: Navigation(size=5, n_test=4),  # every 5x5 maze held out: none to train on
                 lambda: Arithmetic(digits=1, n_test=200), lambda: Arithmetic(ops="/")]:
        with pytest.raises(ValueError):
            make()


# ---------------------------------------------------------------- model: cache and prefix

def tiny_model(task, seed=0):
    torch.manual_seed(seed)
    cfg = maxrl.ModelConfig(len(task.vocab), task.prompt_len + task.max_completion_len,
                            n_layer=2, n_head=2, n_embd=16)
    return maxrl.Transformer(cfg)


def test_kv_cache_sampling_equals_full_recompute():
    task = Navigation(size=5, n_test=2)
    model = tiny_model(task)
    prompts = maxrl.prompt_tensor(task, task.test_problems[:2], "cpu")
    runs = [maxrl.sample_completions(model, prompts, 5, task.max_completion_len, task.stop_id,
                                     torch.Generator().manual_seed(7), use_cache=use_cache)
            for use_cache in (True, False)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0].shape[:2] == (2, 5)


def full_sequence_logprobs(model, prompts, completions, lengths):
    """Reference: every completion run with its own copy of the prompt, no cache."""
    B, N, Tc = completions.shape
    sequences = torch.cat([prompts.repeat_interleave(N, 0), completions.view(B * N, Tc)], 1)
    logits, _ = model(sequences[:, :-1])
    token_logprob = logits.log_softmax(-1)[:, -Tc:].gather(-1, sequences[:, -Tc:, None])[..., 0]
    mask = torch.arange(Tc) < lengths.view(B * N, 1)
    return (token_logprob * mask).sum(-1).view(B, N)


def test_shared_prefix_logprobs_and_gradients_equal_full_sequence():
    task = Navigation(size=5, n_test=2)
    model = tiny_model(task)
    prompts = maxrl.prompt_tensor(task, task.test_problems[:2], "cpu")
    completions, lengths = maxrl.sample_completions(model, prompts, 4, task.max_completion_len,
                                                    task.stop_id, torch.Generator().manual_seed(1))
    grads = []
    for fn in (maxrl.completion_logprobs, full_sequence_logprobs):
        model.zero_grad()
        seq_logprob = fn(model, prompts, completions, lengths)
        seq_logprob.sum().backward()
        grads.append((seq_logprob.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    for shared, full in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(shared, full, atol=1e-5)


# ---------------------------------------------------------------- command line

def run_cli(*flags, cwd=HERE):
    return subprocess.run([sys.executable, str(HERE / "maxrl.py"), *flags], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


TINY = ["--steps=2", "--sft-steps=2", "--eval-prompts=8", "--eval-every=1", "--batch=2",
        "--n-layer=1", "--n-embd=16", "--n-head=2"]


@pytest.mark.parametrize("task_flags", [["--task=nav", "--size=7", "--N=4"],
                                        ["--task=arith", "--methods=ml,maxrl,rloo", "--N=2"]])
def test_cli_smoke_run_writes_results_and_plots(tmp_path, task_flags):
    result = run_cli(*task_flags, *TINY, f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "coverage" in result.stdout
    summary = json.loads((tmp_path / "results.json").read_text())
    assert {"task", "N", "seed", "config", "methods"} <= summary.keys()
    for name, method in summary["methods"].items():
        assert {"final", "curve", "wall_s"} <= method.keys()
        assert {"pass@1", "coverage"} <= method["final"].keys()
        assert [c["step"] for c in method["curve"]] == [0, 1, 2]
        assert {"step", "rollouts", "pass@1"} <= method["curve"][-1].keys()
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "pass_at_k.png").stat().st_size > 0


@pytest.mark.parametrize("flags", [
    ["--task=chess"], ["--methods=rloo,ppo"], ["--N=0"], ["--N=1", "--methods=rloo"],
    ["--N=2.5"], ["--steps=-1"], ["--lr=-0.1"], ["--batch=0"], ["--size=6"], ["--size=3"],
    ["--methods=ml"], ["--task=arith", "--digits=0"], ["--eval-every=0"], ["--n-embd=30"],
    ["--methods="], ["--bogus-flag"],
] + ([["--device=cuda"]] if not torch.cuda.is_available() else []))
def test_bad_input_exits_2_with_one_line(tmp_path, flags):
    out = tmp_path / "out"
    result = run_cli(*flags, f"--out={out}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
