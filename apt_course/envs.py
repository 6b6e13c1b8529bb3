"""Small environments for chapters 01-03: a gridworld MDP and CartPole (single and vectorised).

All of them follow the Gymnasium API without depending on Gymnasium:

* ``reset(seed=None) -> (obs, info)``
* ``step(action) -> (obs, reward, terminated, truncated, info)``

``terminated`` means the episode reached a terminal state (the pole fell, the agent reached the goal);
``truncated`` means it was cut by a time limit (the state is not terminal: its value is not zero).

:class:`CartPole` reproduces Gymnasium's ``CartPole-v1`` state for state (same dynamics, same reset
sampling from a seeded ``numpy.random.Generator``, same 500-step limit); ``tests/test_envs.py`` checks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def check_discount(gamma: float) -> float:
    """Return ``gamma`` as a float, or raise a ValueError saying why it is not a discount."""
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"discount gamma must be a number in [0, 1], got {gamma!r}") from None
    if not 0.0 <= g <= 1.0 or math.isnan(g):
        raise ValueError(
            f"discount gamma must be in [0, 1], got {gamma!r}: gamma weighs a reward k steps ahead by "
            "gamma**k, so use e.g. 0.9 or 0.99 (gamma = 1 only when every episode terminates)."
        )
    return g


def make_rng(seed: int | None) -> np.random.Generator:
    """A NumPy Generator seeded exactly like Gymnasium's ``np_random`` (PCG64 over a SeedSequence)."""
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(None if seed is None else int(seed))))


def _check_action(action, n_actions: int) -> int:
    if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, np.integer)):
        if isinstance(action, np.ndarray) and action.shape == () and np.issubdtype(action.dtype, np.integer):
            action = int(action)
        else:
            raise ValueError(
                f"action must be an integer in 0..{n_actions - 1}, got {action!r} ({type(action).__name__}); "
                "pass e.g. int(action) for a tensor or array element."
            )
    if not 0 <= int(action) < n_actions:
        raise ValueError(f"action {action} is out of range: this environment has actions 0..{n_actions - 1}.")
    return int(action)


# ----------------------------------------------------------------------------------------------------------
# Tabular MDPs and the gridworld
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TabularMDP:
    """A finite MDP as arrays: ``P[s, a, s']`` transition probabilities, ``R[s, a]`` expected reward.

    ``terminal[s]`` marks absorbing states (all their actions loop to themselves with reward 0).
    The value of a policy pi satisfies  V(s) = sum_a pi(a|s) [R(s,a) + gamma sum_s' P(s'|s,a) V(s')].
    """

    P: np.ndarray
    R: np.ndarray
    gamma: float
    terminal: np.ndarray | None = None

    def __post_init__(self):
        self.P = np.asarray(self.P, dtype=np.float64)
        self.R = np.asarray(self.R, dtype=np.float64)
        self.gamma = check_discount(self.gamma)
        if self.P.ndim != 3 or self.P.shape[0] != self.P.shape[2]:
            raise ValueError(f"P must have shape (S, A, S), got {self.P.shape}")
        if self.R.shape != self.P.shape[:2]:
            raise ValueError(f"R must have shape (S, A) = {self.P.shape[:2]}, got {self.R.shape}")
        if (self.P < 0).any() or not np.allclose(self.P.sum(-1), 1.0):
            raise ValueError("every P[s, a, :] must be a probability distribution (non-negative, summing to 1)")
        if self.terminal is None:
            self.terminal = np.zeros(self.n_states, dtype=bool)
        self.terminal = np.asarray(self.terminal, dtype=bool)

    @property
    def n_states(self) -> int:
        return self.P.shape[0]

    @property
    def n_actions(self) -> int:
        return self.P.shape[1]


# Actions of the gridworld: the row/column move of each.
ACTIONS = {0: ("up", (-1, 0)), 1: ("right", (0, 1)), 2: ("down", (1, 0)), 3: ("left", (0, -1))}
ARROWS = {0: "↑", 1: "→", 2: "↓", 3: "←"}

DEFAULT_LAYOUT = (
    "S...#...",
    ".##.#.#.",
    "....#.#.",
    ".#......",
    ".#.##.#H",
    "...#...G",
)


@dataclass
class GridWorld(TabularMDP):
    """A gridworld as an MDP and as an environment you can step.

    Layout characters: ``S`` start, ``.`` free, ``#`` wall, ``G`` goal (reward ``goal_reward``, terminal),
    ``H`` hole (reward ``hole_reward``, terminal). Each move costs ``step_reward``. Moving into a wall or
    off the grid leaves the agent in place. With ``slip > 0`` ("slippery") the agent moves in the intended
    direction with probability ``1 - slip`` and in each perpendicular direction with ``slip / 2``.

    States are numbered row by row over the non-wall cells; ``cells[s]`` is the (row, col) of state ``s``.
    """

    P: np.ndarray = field(init=False, repr=False)
    R: np.ndarray = field(init=False, repr=False)
    gamma: float = 0.95
    terminal: np.ndarray | None = field(init=False, repr=False, default=None)
    layout: tuple[str, ...] = DEFAULT_LAYOUT
    slip: float = 0.0
    step_reward: float = -0.01
    goal_reward: float = 1.0
    hole_reward: float = -1.0
    max_episode_steps: int = 200

    def __post_init__(self):
        if not 0.0 <= self.slip <= 1.0:
            raise ValueError(f"slip must be a probability in [0, 1], got {self.slip!r}")
        rows = [str(r) for r in self.layout]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("every row of the layout must have the same length")
        if sum(r.count("S") for r in rows) != 1:
            raise ValueError("the layout needs exactly one start cell 'S'")
        bad = set("".join(rows)) - set("S.#GH")
        if bad:
            raise ValueError(f"unknown layout characters {sorted(bad)}: use S . # G H")
        self.layout = tuple(rows)
        self.shape = (len(rows), len(rows[0]))
        self.cells = [(i, j) for i, r in enumerate(rows) for j, c in enumerate(r) if c != "#"]
        index = {cell: s for s, cell in enumerate(self.cells)}
        S, A = len(self.cells), len(ACTIONS)
        P = np.zeros((S, A, S))
        R = np.zeros((S, A))
        kind = [rows[i][j] for i, j in self.cells]
        terminal = np.array([k in "GH" for k in kind])
        reward_in = {"G": self.goal_reward, "H": self.hole_reward}

        def move(s, a):
            (i, j), (di, dj) = self.cells[s], ACTIONS[a][1]
            return index.get((i + di, j + dj), s)  # walls and edges are not in the index: stay put

        for s in range(S):
            for a in range(A):
                if terminal[s]:
                    P[s, a, s] = 1.0
                    continue
                outcomes = [(a, 1.0 - self.slip), ((a + 1) % 4, self.slip / 2), ((a + 3) % 4, self.slip / 2)]
                for a2, p in outcomes:
                    if p > 0:
                        s2 = move(s, a2)
                        P[s, a, s2] += p
                        R[s, a] += p * (self.step_reward + reward_in.get(kind[s2], 0.0))
        self.P, self.R, self.terminal = P, R, terminal
        self.start = index[next((i, r.index("S")) for i, r in enumerate(rows) if "S" in r)]
        self._rng = make_rng(None)
        self._state: int | None = None
        self._done = False
        self._t = 0
        super().__post_init__()

    # --- the environment API ---------------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = make_rng(seed)
        self._state, self._done, self._t = self.start, False, 0
        return self._state, {}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step(): the episode has not started")
        if self._done:
            raise RuntimeError("this episode is over (terminated or truncated): call reset() to start a new one")
        a = _check_action(action, self.n_actions)
        s = self._state
        s2 = int(self._rng.choice(self.n_states, p=self.P[s, a]))
        kind = self.layout[self.cells[s2][0]][self.cells[s2][1]]
        reward = self.step_reward + {"G": self.goal_reward, "H": self.hole_reward}.get(kind, 0.0)
        self._t += 1
        terminated = bool(self.terminal[s2])
        truncated = not terminated and self._t >= self.max_episode_steps
        self._state, self._done = s2, terminated or truncated
        return s2, float(reward), terminated, truncated, {"cell": self.cells[s2]}

    # --- helpers for plotting ---------------------------------------------------------------------------
    def to_grid(self, values) -> np.ndarray:
        """Per-state values as a (rows, cols) array with NaN on walls (for a heatmap)."""
        grid = np.full(self.shape, np.nan)
        for s, (i, j) in enumerate(self.cells):
            grid[i, j] = values[s]
        return grid

    def render_policy(self, policy) -> str:
        """The greedy policy as text arrows (walls ``#``, goal ``G``, hole ``H``)."""
        out = [list(r) for r in self.layout]
        for s, (i, j) in enumerate(self.cells):
            if not self.terminal[s]:
                out[i][j] = ARROWS[int(policy[s])]
        return "\n".join("".join(r) for r in out)


# ----------------------------------------------------------------------------------------------------------
# CartPole
# ----------------------------------------------------------------------------------------------------------

GRAVITY, MASSCART, MASSPOLE, LENGTH, FORCE_MAG, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
TOTAL_MASS = MASSCART + MASSPOLE
POLEMASS_LENGTH = MASSPOLE * LENGTH
THETA_LIMIT = 12 * 2 * math.pi / 360  # 12 degrees
X_LIMIT = 2.4


def cartpole_dynamics(state: np.ndarray, action) -> np.ndarray:
    """One Euler step (tau = 0.02 s) of the classic cart-pole (Barto, Sutton & Anderson 1983).

    ``state = (x, x_dot, theta, theta_dot)`` with shape (4,) or (N, 4); ``action`` 1 pushes right, 0 left.
        theta_acc = (g sin th - cos th * tmp) / (l (4/3 - m_p cos^2 th / M)),  tmp = (F + m_p l th_dot^2 sin th) / M
        x_acc     = tmp - m_p l theta_acc cos th / M
    """
    x, x_dot, theta, theta_dot = np.moveaxis(state, -1, 0)
    force = np.where(np.asarray(action) == 1, FORCE_MAG, -FORCE_MAG)
    costheta, sintheta = np.cos(theta), np.sin(theta)
    temp = (force + POLEMASS_LENGTH * np.square(theta_dot) * sintheta) / TOTAL_MASS
    thetaacc = (GRAVITY * sintheta - costheta * temp) / (
        LENGTH * (4.0 / 3.0 - MASSPOLE * np.square(costheta) / TOTAL_MASS)
    )
    xacc = temp - POLEMASS_LENGTH * thetaacc * costheta / TOTAL_MASS
    x = x + TAU * x_dot
    x_dot = x_dot + TAU * xacc
    theta = theta + TAU * theta_dot
    theta_dot = theta_dot + TAU * thetaacc
    return np.stack((x, x_dot, theta, theta_dot), axis=-1).astype(np.float64)


def cartpole_failed(state: np.ndarray) -> np.ndarray:
    """True where the cart left [-2.4, 2.4] or the pole tilted past 12 degrees."""
    x, theta = state[..., 0], state[..., 2]
    return (x < -X_LIMIT) | (x > X_LIMIT) | (theta < -THETA_LIMIT) | (theta > THETA_LIMIT)


class CartPole:
    """CartPole-v1: keep a pole upright by pushing the cart left (0) or right (1); +1 per step.

    The episode terminates when the pole passes +-12 degrees or the cart leaves +-2.4, and is truncated
    at ``max_episode_steps`` (500). Observations are float32 ``(x, x_dot, theta, theta_dot)``.
    """

    observation_dim = 4
    n_actions = 2

    def __init__(self, max_episode_steps: int = 500):
        self.max_episode_steps = max_episode_steps
        self.np_random = make_rng(None)
        self.state: np.ndarray | None = None
        self._done = False
        self._t = 0

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.np_random = make_rng(seed)
        self.state = self.np_random.uniform(low=-0.05, high=0.05, size=(4,))
        self._done, self._t = False, 0
        return self.state.astype(np.float32), {}

    def step(self, action):
        if self.state is None:
            raise RuntimeError("call reset() before step(): the episode has not started")
        if self._done:
            raise RuntimeError("this episode is over (terminated or truncated): call reset() to start a new one")
        a = _check_action(action, self.n_actions)
        self.state = cartpole_dynamics(self.state, a)
        self._t += 1
        terminated = bool(cartpole_failed(self.state))
        truncated = not terminated and self._t >= self.max_episode_steps
        self._done = terminated or truncated
        return self.state.astype(np.float32), 1.0, terminated, truncated, {}


class VecCartPole:
    """``num_envs`` CartPoles stepped together in NumPy arrays, with automatic reset.

    ``step(actions)`` takes an int array of shape (N,) and returns arrays of shape (N, ...). When an
    episode ends (terminated or truncated) that env is reset in the same call: the returned observation
    is already the first one of the next episode, and ``info["final_obs"][i]`` holds the last observation
    of the finished episode (needed to bootstrap a truncated episode). ``info["episode_return"]`` and
    ``info["episode_length"]`` are NaN except where an episode just finished.
    """

    observation_dim = 4
    n_actions = 2

    def __init__(self, num_envs: int, max_episode_steps: int = 500, seed: int | None = None):
        if num_envs < 1:
            raise ValueError(f"num_envs must be at least 1, got {num_envs}")
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        self.np_random = make_rng(seed)
        self.state: np.ndarray | None = None

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.np_random = make_rng(seed)
        self.state = self.np_random.uniform(-0.05, 0.05, size=(self.num_envs, 4))
        self.t = np.zeros(self.num_envs, dtype=np.int64)
        self.ep_return = np.zeros(self.num_envs)
        return self.state.astype(np.float32), {}

    def step(self, actions):
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) or not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(f"actions must be an int array of shape ({self.num_envs},), got {actions!r}")
        if ((actions < 0) | (actions >= self.n_actions)).any():
            raise ValueError(f"every action must be 0 or 1, got {actions}")
        self.state = cartpole_dynamics(self.state, actions)
        self.t += 1
        rewards = np.ones(self.num_envs, dtype=np.float32)
        self.ep_return += rewards
        terminated = cartpole_failed(self.state)
        truncated = ~terminated & (self.t >= self.max_episode_steps)
        done = terminated | truncated
        obs = self.state.astype(np.float32)
        info = {"final_obs": obs.copy(), "episode_return": np.full(self.num_envs, np.nan),
                "episode_length": np.full(self.num_envs, np.nan)}
        if done.any():
            info["episode_return"][done] = self.ep_return[done]
            info["episode_length"][done] = self.t[done]
            self.state[done] = self.np_random.uniform(-0.05, 0.05, size=(int(done.sum()), 4))
            self.t[done] = 0
            self.ep_return[done] = 0.0
            obs = self.state.astype(np.float32)
        return obs, rewards, terminated, truncated, info
