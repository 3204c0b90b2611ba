"""Synthetic binary-reward tasks for MaxRL: arithmetic and maze navigation.

Both tasks share one small interface, so the trainer in maxrl.py never looks inside a task:

    task.vocab, task.pad_id, task.bos_id, task.stop_id   token table and special ids
    task.prompt_len, task.max_completion_len             every prompt has the same length
    task.unique_answers                                  True if exactly one completion is correct
    task.test_problems                                   the held-out split (fixed at construction)
    task.sample_train(n, rng, from_pool=True)            n training problems, never a test problem
    task.train_pool                                      None (infinite data) or the fixed training set
                                                         (from_pool=False: fresh ones even so)
    task.encode_prompt(problem) -> list[int]
    task.reference_completion(problem) -> list[int]      a correct completion (for the warm start)
    task.check(problem, completion) -> (ok, reason)      the verifier
    task.reward(problem, completion) -> 0 or 1           int(ok)
    task.reward_tracker(problems, n, device)             None, or a tracker (MazeWalks) that follows
                                                         n sampled completions of each problem token
                                                         by token: tracker.decided(rows, tokens) says
                                                         which rewards are now decided (mazes)
    task.render(problem, completion) -> str              a readable line for printing failures

A completion is the list of sampled token ids up to and including the stop token (or the
whole sampled list if the stop token never came, which is wrong unless the task's answer is
a single token: then max_completion_len = 1 and the completion is that one token).
"""

import random
from collections import deque

import torch

SPECIALS = ["<pad>", "<bos>", "<eos>"]


class Task:
    """Shared plumbing: vocabulary lookup, the disjoint train/test split, and the two data
    regimes of the paper. Infinite data (train_pool=0, its maze study): every training draw is
    a fresh random problem. Data-scarce (train_pool=M, its GSM8K study): M training problems
    are drawn once, and training samples from that fixed pool, epoch after epoch."""

    unique_answers = False

    def __init__(self, vocab, n_test, seed, train_pool=0):
        self.vocab = SPECIALS + vocab
        self.token_id = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.test_problems = self._distinct_problems(n_test, random.Random(f"test-{seed}"))
        self._test_keys = {self.key(p) for p in self.test_problems}
        self.train_pool = None
        self.sample_train(1, random.Random(seed))  # fails now, not mid-run, if none are left
        if train_pool:
            self.train_pool = self.sample_train(train_pool, random.Random(f"pool-{seed}"))

    def _distinct_problems(self, n, rng):
        problems, keys = [], set()
        for _ in range(100 * n + 1000):
            if len(problems) == n:
                return problems
            problem = self.random_problem(rng)
            if self.key(problem) not in keys:
                keys.add(self.key(problem))
                problems.append(problem)
        raise ValueError(f"cannot find {n} distinct held-out problems: use fewer --eval-prompts "
                         "or a larger task (7x7 has 192 distinct mazes, 5x5 only 4)")

    def sample_train(self, n, rng, from_pool=True):
        """n training problems drawn from rng: from the pool if there is one (and from_pool), else
        fresh ones, where anything in the held-out split is redrawn."""
        if self.train_pool is not None and from_pool:
            return [rng.choice(self.train_pool) for _ in range(n)]
        problems = []
        for _ in range(1000 * n):
            if len(problems) == n:
                return problems
            problem = self.random_problem(rng)
            if self.key(problem) not in self._test_keys:
                problems.append(problem)
        raise ValueError("the held-out split leaves no training problems: use fewer "
                         "--eval-prompts or a larger task")

    def encode(self, tokens):
        return [self.token_id[t] for t in tokens]

    def decode(self, ids):
        return [self.vocab[i] for i in ids]

    def reward(self, problem, completion):
        return int(self.check(problem, completion)[0])

    def reward_tracker(self, problems, n, device):
        """None: a completion's reward is known only at its end (see Navigation's)."""
        return None


class Arithmetic(Task):
    """Integer arithmetic with a unique answer.

    Encoding: operands are zero-padded to `digits` characters so every prompt has the same
    length; the answer is written plainly (a '-' for negatives) and ends with <eos>.
    Operand lengths are drawn uniformly from 1..digits, so difficulty varies across prompts.

        prompt      <bos> 0 4 7 + 1 2 8 =        (47 + 128, digits=3)
        completion  1 7 5 <eos>                  the only correct completion

    Success: the completion equals the answer tokens followed by <eos>, exactly. Because the
    correct completion is unique, the pass rate p(x) = pi(answer | x) can be computed exactly
    by teacher forcing, and maximum likelihood is plain cross-entropy on the answer.

    With single_token=True the answer is one token from a table with one entry per possible
    result (199 of them for 2-digit '+'), and nothing follows it: sampling the answer is
    drawing a class label, the analogue of the paper's image classification.

        prompt      <bos> 4 7 + 2 8 =            completion  [75]
    """

    unique_answers = True
    OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

    def __init__(self, digits=2, ops="+", n_test=128, seed=0, single_token=False, train_pool=0):
        if digits < 1 or not ops or set(ops) - set(self.OPS):
            raise ValueError(f"arith needs digits >= 1 and ops from '+-*' (got {digits}, {ops!r})")
        self.digits, self.ops, self.single_token = digits, ops, single_token
        self.prompt_len = 1 + 2 * digits + 2
        if single_token:
            largest = 10**digits - 1  # every op is monotone in each operand: corners bound it
            corners = [self.OPS[op](a, b) for op in ops for a in (0, largest) for b in (0, largest)]
            answer_tokens = [f"[{v}]" for v in range(min(corners), max(corners) + 1)]
            self.max_completion_len = 1
        else:
            answer_tokens = []
            answer_digits = 2 * digits if "*" in ops else digits + 1
            self.max_completion_len = answer_digits + ("-" in ops) + 1
        super().__init__(list("0123456789+-*=") + answer_tokens, n_test, seed, train_pool)
        self.stop_id = self.eos_id

    def random_problem(self, rng):
        return (self.random_operand(rng), rng.choice(self.ops), self.random_operand(rng))

    def random_operand(self, rng):
        n_digits = rng.randint(1, self.digits)
        return rng.randrange(0 if n_digits == 1 else 10 ** (n_digits - 1), 10**n_digits)

    def key(self, problem):
        return problem

    def encode_prompt(self, problem):
        a, op, b = problem
        return [self.bos_id] + self.encode(f"{a:0{self.digits}d}{op}{b:0{self.digits}d}=")

    def reference_completion(self, problem):
        a, op, b = problem
        if self.single_token:
            return self.encode([f"[{self.OPS[op](a, b)}]"])
        return self.encode(str(self.OPS[op](a, b))) + [self.eos_id]

    def check(self, problem, completion):
        answer = self.reference_completion(problem)
        if completion == answer:
            return True, "correct"
        if self.eos_id not in completion and not self.single_token:
            return False, "no <eos>"
        return False, "wrong answer"

    def render(self, problem, completion):
        a, op, b = problem
        said = "".join(t.strip("[]") for t in self.decode(completion) if t not in SPECIALS)
        return f"{a}{op}{b} = {self.OPS[op](a, b)}, model said {said!r}"


WALL, PATH, START, GOAL = "WALL", "PATH", "START", "GOAL"
MOVES = {"UP": (-1, 0), "DOWN": (1, 0), "LEFT": (0, -1), "RIGHT": (0, 1)}


class Navigation(Task):
    """Shortest-path-style navigation in mazes made by randomized Prim's algorithm.

    A maze is a size x size grid (size odd); cells sit at odd coordinates, the border is wall.
    By default (max_moves = 0) the start and the goal sit at opposite corners, (1, 1) and
    (size-2, size-2), as in the paper: every walk is long (at least 2 (size - 3) moves), so a
    model that reads the maze move by move still fails often by compounding small errors. With
    max_moves = D > 0 the start is random and the goal at a shortest-path distance uniform in
    1..D from it (short walks: the early phase). `loops` knocks out that fraction of the
    remaining inner walls, so several distinct shortest paths can exist.

    Encoding (one token per square, word-level as in the paper), the border left out: it is
    wall in every maze, so it says nothing and would only lengthen the prompt (94 tokens at
    9x9 with it, 60 without):

        prompt      <bos> GRID_START
                    START PATH PATH NEWLINE                 a 5x5 maze: its inner 3x3 squares
                    WALL  WALL PATH NEWLINE
                    GOAL  PATH PATH NEWLINE
                    GRID_END PATH_START
        completion  RIGHT RIGHT DOWN DOWN LEFT LEFT DONE

    Success: every token before DONE is a move, no move enters a wall or leaves the grid, and
    the goal is reached; reaching the goal ends the episode, so DONE must follow at once.
    Revisiting squares is allowed. Many completions can be correct, so the pass rate can only
    be estimated by sampling. Held-out mazes are deduplicated by grid content: a test maze
    never appears in training, with any start and goal. The space is small at small sizes:
    5x5 has 4 distinct mazes, 7x7 has 192 (so 128 held out leave 64 grids to train on, each
    with about 270 start/goal pairs: data-scarce whatever the pool), 9x9 (the default) has
    100,352, each with about 900 start/goal pairs, so a training maze practically never repeats
    (the paper's infinite-data regime) unless train_pool fixes a finite set.
    """

    def __init__(self, size=9, loops=0.0, n_test=128, seed=0, train_pool=0, max_moves=0):
        if size < 5 or size % 2 == 0 or size > 31:
            raise ValueError(f"maze size must be odd and in [5, 31] (got {size})")
        if not 0.0 <= loops <= 1.0:
            raise ValueError(f"loops must be a fraction in [0, 1] (got {loops})")
        if not 0 <= max_moves <= size * size // 4:
            raise ValueError(f"max moves must be in [0, {size * size // 4}] for size {size} (got {max_moves})")
        self.size, self.loops, self.max_moves = size, loops, max_moves
        self.prompt_len = 2 + (size - 2) * (size - 1) + 2
        self.max_completion_len = size * size // 2 + 1  # enough for any shortest path, plus DONE
        names = [WALL, PATH, START, GOAL, "NEWLINE", "GRID_START", "GRID_END", "PATH_START"]
        super().__init__(names + list(MOVES) + ["DONE"], n_test, seed, train_pool)
        self.stop_id = self.token_id["DONE"]

    def random_problem(self, rng):
        grid = prim_maze(self.size, rng, self.loops)
        if not self.max_moves:  # opposite corners: always cells, so always open
            return (grid, (1, 1), (self.size - 2, self.size - 2))
        open_squares = [(r, c) for r in range(self.size) for c in range(self.size) if grid[r][c]]
        moves = rng.randint(1, self.max_moves)  # the shortest path's length, uniform in 1..max_moves
        for _ in open_squares:  # a start with a square that far (almost always the first)
            start = rng.choice(open_squares)
            _, distance = bfs_tree(grid, start)
            goals = [square for square, d in distance.items() if d == moves]
            if goals:
                return (grid, start, rng.choice(goals))
        return self.random_problem(rng)  # no two squares of this maze are that far apart: another maze

    def reward_tracker(self, problems, n, device):
        """A MazeWalks following n sampled completions of each of these problems."""
        return MazeWalks(self, problems, n, device)

    def path_length(self, problem):
        """Moves of a shortest path: how hard the maze is."""
        return len(shortest_path(*problem))

    def key(self, problem):
        return problem[0]

    def encode_prompt(self, problem):
        grid, start, goal = problem
        tokens = ["GRID_START"]
        for r in range(1, self.size - 1):  # inside the border
            for c in range(1, self.size - 1):
                tokens.append(START if (r, c) == start else GOAL if (r, c) == goal
                              else PATH if grid[r][c] else WALL)
            tokens.append("NEWLINE")
        return [self.bos_id] + self.encode(tokens + ["GRID_END", "PATH_START"])

    def reference_completion(self, problem):
        return self.encode(shortest_path(*problem) + ["DONE"])

    def check(self, problem, completion):
        grid, (r, c), goal = problem
        for step, token in enumerate(self.decode(completion)):
            if token == "DONE":
                return ((r, c) == goal, "correct" if (r, c) == goal else "DONE before the goal")
            if (r, c) == goal:
                return False, f"goal reached, then {token} at step {step}"
            if token not in MOVES:
                return False, f"{token} is not a move (step {step})"
            r, c = r + MOVES[token][0], c + MOVES[token][1]
            if not (0 <= r < len(grid) and 0 <= c < len(grid)):
                return False, f"left the grid at step {step}"
            if not grid[r][c]:
                return False, f"walked into a wall at step {step}"
        return False, "no DONE"

    def render(self, problem, completion):
        _, start, goal = problem
        moves = " ".join(self.decode(completion))
        return f"start {start} goal {goal}: {moves} -> {self.check(problem, completion)[1]}"


def prim_maze(size, rng, loops=0.0):
    """Randomized Prim's algorithm. Returns the grid as a tuple of tuples of bools (True = open)."""
    grid = [[False] * size for _ in range(size)]
    first = (rng.randrange(1, size, 2), rng.randrange(1, size, 2))
    grid[first[0]][first[1]] = True
    frontier = [(first, d) for d in MOVES.values()]  # (cell, direction to a neighbour cell)
    while frontier:
        (r, c), (dr, dc) = frontier.pop(rng.randrange(len(frontier)))
        nr, nc = r + 2 * dr, c + 2 * dc
        if 0 < nr < size and 0 < nc < size and not grid[nr][nc]:
            grid[r + dr][c + dc] = grid[nr][nc] = True
            frontier.extend(((nr, nc), d) for d in MOVES.values())
    inner_walls = [(r, c) for r in range(1, size - 1) for c in range(1, size - 1)
                   if not grid[r][c] and (r % 2) != (c % 2)]  # walls between two cells
    for r, c in rng.sample(inner_walls, round(loops * len(inner_walls))):
        grid[r][c] = True
    return tuple(tuple(row) for row in grid)


def bfs_tree(grid, start):
    """Breadth-first search over the open squares from start: {square: (previous square, move)}
    (start maps to None) and {square: number of moves from start}."""
    came_from, distance = {start: None}, {start: 0}
    queue = deque([start])
    while queue:
        square = queue.popleft()
        for name, (dr, dc) in MOVES.items():
            nxt = (square[0] + dr, square[1] + dc)
            inside = 0 <= nxt[0] < len(grid) and 0 <= nxt[1] < len(grid)
            if inside and grid[nxt[0]][nxt[1]] and nxt not in came_from:
                came_from[nxt], distance[nxt] = (square, name), distance[square] + 1
                queue.append(nxt)
    return came_from, distance


def shortest_path(grid, start, goal):
    """The moves of one shortest path from start to goal (the first one breadth-first search finds)."""
    came_from, _ = bfs_tree(grid, start)
    moves = []
    while came_from[goal] is not None:
        goal, name = came_from[goal]
        moves.append(name)
    return moves[::-1]


class MazeWalks:
    """Follows the walks of sampled maze completions, token by token, to say when each one's
    reward is decided: at any token after the goal is reached, a token that is not a move, or a
    move into a wall or off the grid, check() returns its verdict whatever follows. Sampling
    then stops that completion there (maxrl.sample_completions).

    The rows are the len(problems) * n completions, row i * n + j the j-th of problem i. The
    contract, which the sampler keeps and a test checks: decided(rows, tokens) is called once per
    sampling step with the rows that have not ended and the token each has just drawn, so every
    completion's tokens come once each, in order; a row that has ended (its stop token, or
    decided(...) returned True for it) never comes again. Each call moves those rows' squares."""

    def __init__(self, task, problems, n, device):
        def per_row(values):
            return torch.tensor(values, device=device).repeat_interleave(n, 0)
        self.is_open = per_row([grid for grid, _, _ in problems])  # (R, size, size)
        self.square = per_row([start for _, start, _ in problems])  # (R, 2) where each walk stands
        self.goal = per_row([goal for _, _, goal in problems])  # (R, 2)
        self.move = torch.zeros(len(task.vocab), 2, dtype=torch.long, device=device)  # token -> (dr, dc)
        self.is_move = torch.zeros(len(task.vocab), dtype=torch.bool, device=device)
        for name, delta in MOVES.items():
            self.move[task.token_id[name]], self.is_move[task.token_id[name]] = torch.tensor(delta), True
        self.size = task.size

    def decided(self, rows, tokens):  # (A,), (A,) -> (A,) bool: these rows' rewards are now decided
        was_at_goal = (self.square[rows] == self.goal[rows]).all(-1)
        to = self.square[rows] + self.move[tokens]  # (A, 2)
        inside = ((to >= 0) & (to < self.size)).all(-1)
        to = to.clamp(0, self.size - 1)  # off the grid: decided below; the clamp only keeps the index valid
        self.square[rows] = to
        return was_at_goal | ~self.is_move[tokens] | ~inside | ~self.is_open[rows, to[:, 0], to[:, 1]]


def make_task(name, n_test=128, seed=0, size=9, loops=0.0, digits=2, ops="+", single_token=False,
              train_pool=0, max_moves=0):
    """Build a task by CLI name; raises ValueError with a readable message on bad settings."""
    if name == "nav":
        return Navigation(size=size, loops=loops, n_test=n_test, seed=seed, train_pool=train_pool,
                          max_moves=max_moves)
    if name == "arith":
        return Arithmetic(digits=digits, ops=ops, n_test=n_test, seed=seed, single_token=single_token,
                          train_pool=train_pool)
    raise ValueError(f"unknown task {name!r} (choose nav or arith)")
