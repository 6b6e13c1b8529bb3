"""Chapter 15: serving an aligned model, measuring it in use, A/B testing versions, and iterative DPO from feedback.

The pieces, each a plain function or a small class:

* **Serving** — :class:`ModelServer` runs an OpenAI-compatible server as a subprocess on a loopback port
  (``transformers serve`` everywhere; ``vllm serve`` named for a GPU) and always stops its whole process group;
  :class:`Fleet` deploys model versions behind it (one ``transformers`` server holds them all, a request's
  ``model`` picks the version; vLLM pins one model per server). :func:`save_for_serving` writes a version with
  its sampling defaults in ``generation_config.json``, which both servers read.
* **Load** — :func:`run_load` sends requests with bounded concurrency through the official ``openai`` client,
  with per-request timeouts, logged retries, and a circuit breaker when the server stops answering;
  :func:`load_summary` gives latency percentiles (:func:`latency_percentiles`) and tokens/s;
  :func:`quality_figures` the earlier chapters' figures computed from the served replies;
  :func:`prometheus_text` exports them in Prometheus' text format with ``prometheus_client``.
* **A/B testing** — :func:`split_traffic`, :func:`two_proportion_ztest`, :func:`sample_size_per_arm`,
  :func:`bootstrap_interval`, :func:`ab_win_rate`, and :func:`ab_test` that runs one.
* **Feedback → DPO** — :func:`simulate_thumbs` (a user with a noisy thumb), :func:`collect_feedback` (with the
  *regenerate* button, and the user's *edit*: the reply they wanted, :func:`wanted_reply`), :func:`validate_feedback`,
  :func:`feedback_to_pairs`, :func:`mix_pairs` (new pairs plus a replay of old ones) and :func:`dpo_round` (chapter
  07's :func:`apt_course.dpo.train_dpo` on the mix, against a frozen reference: the notebook keeps the first version
  there every round; optionally LoRA adapters, merged before the version is served); :func:`regression_figures` is
  the check on general ability and safety.
"""

from __future__ import annotations

import atexit
import copy
import errno
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from . import world
from .constitution import evaluate as constitution_evaluate
from .constitution import is_refusal, load_constitution, score_replies
from .dpo import DPOConfig, train_dpo
from .evaluate import accuracy
from .model import save_model
from .sft import add_lora
from .tokenizer import messages_for
from .training import progress
from .utils import available_cores

logger = logging.getLogger("apt_course.serving")

BACKENDS = ("transformers", "vllm")
THUMBS = ("up", "down")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds, Prometheus histogram


# ---------------------------------------------------------------- the server process

class ServerError(RuntimeError):
    """The model server could not start, or stopped."""


class PortInUseError(ServerError):
    """The port asked for is taken by another process."""


class ServerStartTimeout(ServerError, TimeoutError):
    """The server did not answer its health check in time."""


SERVING_MODULES = {"openai": "openai", "fastapi": "transformers[serving]", "uvicorn": "transformers[serving]",
                   "prometheus_client": "prometheus-client"}


def require_serving(modules=tuple(SERVING_MODULES)) -> None:
    """Raise an ImportError that names the install command when a package chapter 15 needs is missing (they are the
    ``serve`` extra, left out of the base install so that Colab's other chapters install less)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"serving needs {', '.join(sorted({SERVING_MODULES.get(m, m) for m in missing}))}, not "
                          f"installed here: run `pip install -e \".[serve]\"` in the course folder (on Colab, chapter "
                          f"15's install cell does it), then restart the kernel")


class LoadFailed(RuntimeError):
    """Requests of a load failed (see :func:`raise_for_errors`)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port no one listens on now (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUseError` when something already listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closed port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise PortInUseError(f"port {port} on {host} is already in use: another server listens there (find it "
                                 f"with `lsof -i :{port}`). Stop it, or pass port=None to take a free port") from None


def server_threads(threads: int | None) -> int | None:
    """The CPU threads a server process gets, as :func:`apt_course.utils.set_cpu_threads` picks the notebook's:
    ``$APT_COURSE_THREADS`` when set, else ``threads``, where 0 means every core available; None leaves the
    server's own default (torch's: every core)."""
    if threads is None:
        return None
    return int(os.environ.get("APT_COURSE_THREADS", "0") or 0) or threads or available_cores()


def server_command(backend: str, model: str | None, host: str, port: int, device: str = "cpu",
                   served_name: str | None = None, dtype: str | None = None) -> list[str]:
    """The command line of an OpenAI-compatible server on ``host:port``.

    ``transformers``: ``transformers serve [MODEL]`` (without a model every request's ``model`` names the folder to
    load, and loaded versions are kept: ``--model-timeout -1``); ``vllm``: ``vllm serve``'s module, one model, served
    under ``served_name``. Both run as ``python -m`` of the current interpreter. ``dtype`` (``"bfloat16"``...) is
    the weights' dtype in the server; None keeps the saved one (``transformers serve``'s ``auto``)."""
    if backend == "transformers":
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve"] + ([str(model)] if model else [])
        return cmd + ["--host", host, "--port", str(port), "--device", "auto" if device == "cuda" else str(device),
                      "--model-timeout", "-1", "--log-level", "warning"] + (["--dtype", dtype] if dtype else [])
    if backend == "vllm":
        if not model:
            raise ValueError("vLLM serves one model per server: pass the model folder")
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", host,
                "--port", str(port), "--served-model-name", served_name or str(model)] + (
                    ["--dtype", dtype] if dtype else [])
    raise ValueError(f"unknown server backend {backend!r}; use one of {BACKENDS}")


# Run in the child: ask Linux to send SIGTERM when the parent (the notebook's kernel) dies, then start the server.
_LAUNCHER = (
    "import ctypes, os, runpy, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "    if os.getppid() != int(sys.argv[1]): sys.exit('the parent process is gone')\n"
    "sys.argv = [sys.argv[3]] + sys.argv[4:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


class ModelServer:
    """An OpenAI-compatible server in a subprocess on a loopback port; a context manager that always stops it.

    ``ModelServer(model, backend, port=None)``: ``port=None`` takes a free port, a taken port is a
    :class:`PortInUseError` before anything starts. :meth:`start` returns once ``GET /health`` answers 200, or raises
    :class:`ServerStartTimeout` after ``startup_timeout`` seconds (:class:`ServerError` if the process exits first),
    quoting the server's last log lines. :meth:`stop` terminates the whole process group (SIGTERM, then SIGKILL);
    it also runs at interpreter exit, and on Linux the server gets SIGTERM if the kernel that started it is killed.
    ``command`` replaces the server's command line (tests). ``threads``: the server's CPU threads
    (:func:`server_threads`: 0 = every core, ``$APT_COURSE_THREADS`` wins); ``dtype``: its weights' dtype
    (:func:`server_command`).
    """

    def __init__(self, model: str | None = None, backend: str = "transformers", host: str = "127.0.0.1",
                 port: int | None = None, device: str = "cpu", startup_timeout: float = 120.0,
                 threads: int | None = None, served_name: str | None = None, log_path: str | Path | None = None,
                 command: list[str] | None = None, env: dict | None = None, dtype: str | None = None):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"host {host!r}: the course serves on a loopback address only (127.0.0.1)")
        self.backend, self.model, self.host, self.device, self.dtype = backend, model, host, device, dtype
        self.port = port
        self.startup_timeout = startup_timeout
        self.threads, self.served_name, self.command, self.extra_env = threads, served_name, command, env or {}
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ModelServer:
        if self.command is None and self.backend == "transformers":
            require_serving(("fastapi", "uvicorn"))
        if self.proc is not None:
            raise ServerError(f"this server is already running (pid {self.proc.pid}); stop() it first")
        if self.port is None:
            self.port = free_port(self.host)
        check_port_free(self.host, self.port)
        cmd = self.command or server_command(self.backend, self.model, self.host, self.port, self.device,
                                             self.served_name, self.dtype)
        if self.log_path is None:
            self.log_path = Path(tempfile.gettempdir()) / f"apt_course_server_{self.port}.log"
        env = dict(os.environ, HF_HUB_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1", **self.extra_env)
        threads = server_threads(self.threads)
        if threads:  # one CPU thread is fastest for a tiny model (utils.set_cpu_threads); a real one gets every core
            env["OMP_NUM_THREADS"] = str(threads)
        if cmd[:2] == [sys.executable, "-m"]:
            cmd = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), "-m"] + cmd[2:]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)  # its own process group: stop() kills all of it
        atexit.register(self.stop)
        logger.info("started %s (pid %d) on %s, log %s", self.backend, self.proc.pid, self.base_url, self.log_path)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the server wrote (its stdout and stderr)."""
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except (OSError, TypeError):
            return "(no log)"
        return "\n".join(text.replace("\r", "\n").strip().splitlines()[-lines:]) or "(nothing logged yet)"

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll ``GET /health`` every 0.1 s until it answers 200 (the model is loaded and the port is open)."""
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
        while True:
            code = self.proc.poll()
            if code is not None:
                tail = self.log_tail()
                cls = PortInUseError if "address already in use" in tail.lower() else ServerError
                raise cls(f"the {self.backend} server exited with code {code} before it was ready. Its last log "
                          f"lines ({self.log_path}):\n{tail}")
            try:
                with opener.open(f"{self.base_url}/health", timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerStartTimeout(
                    f"the {self.backend} server on {self.base_url} did not answer /health within {timeout:.0f} s. "
                    f"Its last log lines ({self.log_path}):\n{self.log_tail()}\nA large model on a CPU needs longer: "
                    "raise startup_timeout; an error above means the model folder or the install is wrong")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the server's process group at once (what a crash looks like to the clients)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self, grace: float = 5.0) -> None:
        """Terminate the process group (SIGTERM, then SIGKILL after ``grace`` seconds); safe to call twice."""
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(grace)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything it started that outlived it
            except (ProcessLookupError, PermissionError):
                pass
            logger.info("stopped the %s server on %s (exit code %s)", self.backend, self.base_url, proc.returncode)
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- model versions behind servers

def save_for_serving(model, tokenizer, path: str | Path, temperature: float = 1.0, max_new_tokens: int = 64) -> Path:
    """Save a version to serve (atomically, :func:`apt_course.model.save_model`) with its default decoding in
    ``generation_config.json``: sampling at ``temperature`` from the full distribution (top-k 0, top-p 1), or greedy
    at 0. A request that names no temperature gets these; ``temperature=0`` in a request is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    saved = copy.deepcopy(model.generation_config)
    gc = model.generation_config
    gc.do_sample = temperature > 0
    gc.temperature, gc.top_k, gc.top_p = (temperature, 0, 1.0) if temperature > 0 else (None, None, None)
    gc.max_new_tokens = max_new_tokens
    gc.pad_token_id, gc.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    try:
        return save_model(model, tokenizer, path)
    finally:
        model.generation_config = saved


@dataclass
class Endpoint:
    """Where one model version answers: an ``openai`` client and the ``model`` name to request."""

    name: str
    client: object
    model: str


def make_client(base_url: str, timeout: float = 30.0):
    """The official ``openai`` client for a local server: no API key, no retries of its own (:func:`send_request`
    retries and logs), environment proxies ignored (loopback)."""
    from openai import DefaultHttpxClient, OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", timeout=timeout, max_retries=0,
                  http_client=DefaultHttpxClient(trust_env=False))


class Fleet:
    """Deployed model versions, by name; a context manager that stops every server it started.

    ``transformers``: one server holds every version (started on the first :meth:`deploy`); a request's ``model`` is
    the version's folder, loaded on first use. ``vllm``: one server per version. :meth:`deploy` ends with one warm-up
    request, so a version's loading time never lands in a measured latency. ``threads``: each server's CPU threads
    (:func:`server_threads`: 0 = every core); ``dtype``: the weights' dtype in the servers (``"bfloat16"`` serves a
    float32 checkpoint in bf16; None keeps the saved dtype)."""

    def __init__(self, backend: str = "transformers", device: str = "cpu", startup_timeout: float = 120.0,
                 threads: int | None = None, timeout: float = 30.0, dtype: str | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown server backend {backend!r}; use one of {BACKENDS}")
        self.backend, self.device, self.startup_timeout = backend, device, startup_timeout
        self.threads, self.timeout, self.dtype = threads, timeout, dtype
        self.servers: dict[str, ModelServer] = {}
        self.endpoints: dict[str, Endpoint] = {}

    def deploy(self, name: str, folder: str | Path) -> Endpoint:
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} holds no saved model (config.json): save the version first "
                                    "(save_for_serving)")
        if self.backend == "transformers" and "shared" not in self.servers:
            self.servers["shared"] = ModelServer(None, "transformers", device=self.device, threads=self.threads,
                                                 startup_timeout=self.startup_timeout, dtype=self.dtype,
                                                 env={"HF_HUB_OFFLINE": "1"}).start()
        if self.backend == "vllm":
            self.servers[name] = ModelServer(str(folder), "vllm", device=self.device, served_name=name,
                                             startup_timeout=self.startup_timeout, dtype=self.dtype).start()
        server = self.servers["shared" if self.backend == "transformers" else name]
        model = str(folder) if self.backend == "transformers" else name
        endpoint = Endpoint(name, make_client(server.base_url, self.timeout), model)
        warm = send_request(endpoint, {"prompt": "hi"}, max_tokens=2, retries=0, timeout=max(60.0, self.timeout))
        if not warm.ok:
            raise ServerError(f"version {name!r} ({folder}) does not answer: {warm.error}. The server's last log "
                              f"lines:\n{server.log_tail()}")
        self.endpoints[name] = endpoint
        return endpoint

    def __getitem__(self, name: str) -> Endpoint:
        if name not in self.endpoints:
            raise KeyError(f"no version {name!r} is deployed; deployed: {sorted(self.endpoints)}")
        return self.endpoints[name]

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- load: requests, retries, timeouts

@dataclass
class Reply:
    """One request as the client saw it: the row asked, which version answered, the text (None when it failed),
    latency (seconds, the last attempt), completion tokens, attempts, the error, and time to the first streamed token."""

    row: dict
    version: str
    text: str | None
    latency_s: float
    completion_tokens: int = 0
    attempts: int = 1
    error: str | None = None
    first_token_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _retryable():
    require_serving(("openai",))
    import openai

    return (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError)  # timeouts included


def _complete(endpoint: Endpoint, kwargs: dict, stream: bool, start: float):
    """``(text, completion tokens, seconds to the first token)`` of one chat completion."""
    client = endpoint.client
    if not stream:
        out = client.chat.completions.create(**kwargs)
        return out.choices[0].message.content or "", (out.usage.completion_tokens if out.usage else 0), None
    parts, chunks, usage, first = [], 0, None, None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if getattr(chunk, "usage", None):
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = time.perf_counter() - start if first is None else first
                parts.append(choice.delta.content)
                chunks += 1
    return "".join(parts), usage if usage is not None else chunks, first


def send_request(endpoint: Endpoint, row: dict, max_tokens: int = 32, temperature: float | None = None,
                 stream: bool = False, retries: int = 2, backoff_s: float = 0.2, timeout: float | None = None,
                 seed: int | None = None) -> Reply:
    """One chat completion of ``row`` (``prompt``, optional ``system``) with up to ``retries`` logged retries after a
    connection error, a timeout (``timeout`` seconds) or a 5xx, waiting ``backoff_s · 2^k`` before retry k+1. A 4xx
    (a wrong request) is not retried. Never raises for a failed request: the :class:`Reply` carries the error.
    ``seed``: the request's sampling seed (OpenAI's ``seed``; ``transformers serve`` and vLLM honour it), so a
    sampled reply is the same whatever else the server is doing."""
    require_serving(("openai",))
    import openai

    kwargs = {"model": endpoint.model, "messages": messages_for(row["prompt"], row.get("system")),
              "max_tokens": max_tokens}
    if temperature is not None:
        kwargs["temperature"] = temperature
    if seed is not None:
        kwargs["seed"] = seed
    target = endpoint if timeout is None else Endpoint(endpoint.name, endpoint.client.with_options(timeout=timeout),
                                                       endpoint.model)
    error, attempt, start = None, 0, time.perf_counter()
    for attempt in range(1, retries + 2):
        start = time.perf_counter()
        try:
            text, tokens, first = _complete(target, kwargs, stream, start)
            return Reply(row, endpoint.name, text, time.perf_counter() - start, tokens, attempt, None, first)
        except _retryable() as e:
            error = f"{type(e).__name__}: {e}"
            if attempt <= retries:
                wait = backoff_s * 2 ** (attempt - 1)
                logger.warning("request to %s failed (%s); retry %d of %d in %.1f s", endpoint.name, error, attempt,
                               retries, wait)
                time.sleep(wait)
        except openai.APIStatusError as e:
            error = f"{type(e).__name__} (HTTP {e.status_code}): {e}"
            break
    return Reply(row, endpoint.name, None, time.perf_counter() - start, 0, attempt, error)


@dataclass
class Load:
    """The replies of a load (in the order of its rows) and its wall-clock time."""

    replies: list[Reply]
    seconds: float


def request_seed(seed: int, i: int) -> int:
    """Request ``i``'s sampling seed in a load seeded ``seed``: distinct per request and per load, below 2^31."""
    return (seed * 1_000_003 + i) % 2**31


def run_load(endpoints: Endpoint | list[Endpoint], rows: list[dict], concurrency: int = 4,
             max_consecutive_failures: int = 8, desc: str = "requests", seed: int | None = None,
             **request_kwargs) -> Load:
    """Send every row (row i to ``endpoints[i]``, or all to one endpoint) with at most ``concurrency`` requests in
    flight (:func:`send_request` for each; ``request_kwargs`` go to it). After ``max_consecutive_failures`` failures in
    a row the server is taken for dead: the rows not yet sent fail at once ("not sent") instead of each waiting out
    its retries, so a load against a crashed server ends in seconds and says so. ``seed``: row i is sampled with
    :func:`request_seed` ``(seed, i)``, so the replies do not depend on the order the requests reach the server
    (None: the server's own random state, different at every run)."""
    if not rows:
        raise ValueError("no requests to send: pass at least one row {'prompt': ...}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    targets = endpoints if isinstance(endpoints, list) else [endpoints] * len(rows)
    if len(targets) != len(rows):
        raise ValueError(f"{len(targets)} endpoints for {len(rows)} rows: give one per row, or a single endpoint")
    state = {"failures": 0, "last": ""}
    lock = threading.Lock()

    def one(i: int) -> Reply:
        with lock:
            dead = state["failures"] >= max_consecutive_failures
        if dead:
            return Reply(rows[i], targets[i].name, None, 0.0, 0, 0,
                         f"not sent: {max_consecutive_failures} requests failed in a row (last: {state['last']})")
        reply = send_request(targets[i], rows[i], seed=None if seed is None else request_seed(seed, i),
                             **request_kwargs)
        with lock:
            state["failures"] = 0 if reply.ok else state["failures"] + 1
            state["last"] = reply.error or state["last"]
        return reply

    start = time.perf_counter()
    replies: list[Reply | None] = [None] * len(rows)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(one, i): i for i in range(len(rows))}
        for future in progress(as_completed(futures), desc, total=len(rows)):
            replies[futures[future]] = future.result()
    return Load(replies, time.perf_counter() - start)


def raise_for_errors(load: Load, max_error_rate: float = 0.0) -> None:
    """Raise :class:`LoadFailed` when more than ``max_error_rate`` of the requests failed, quoting the first error."""
    failed = [r for r in load.replies if not r.ok]
    if failed and len(failed) > max_error_rate * len(load.replies):
        raise LoadFailed(f"{len(failed)} of {len(load.replies)} requests failed (first: {failed[0].error}). Is the "
                         "server still running? Its log is in ModelServer.log_tail()")


# ---------------------------------------------------------------- measuring a load

def latency_percentiles(latencies, qs=(50, 95)) -> dict[int, float]:
    """Percentiles by linear interpolation between order statistics (numpy's default): for sorted x_0..x_{n-1},
    rank r = q/100 · (n - 1) and P_q = x_⌊r⌋ + (r - ⌊r⌋) · (x_⌈r⌉ - x_⌊r⌋)."""
    xs = sorted(float(x) for x in latencies)
    if not xs:
        raise ValueError("no latencies: every request failed, or none was sent")
    out = {}
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} is outside [0, 100]")
        r = q / 100 * (len(xs) - 1)
        lo, hi = math.floor(r), math.ceil(r)
        out[q] = xs[lo] + (r - lo) * (xs[hi] - xs[lo])
    return out


def load_summary(load: Load) -> dict:
    """requests, errors, latency p50 and p95 (ms, successful requests), completion tokens per second of wall time
    (Σ tokens / wall), requests per second, and p50 of time to first token for a streamed load."""
    ok = [r for r in load.replies if r.ok]
    pct = latency_percentiles([r.latency_s for r in ok])
    out = {"requests": len(load.replies), "errors": len(load.replies) - len(ok), "latency_p50_ms": 1000 * pct[50],
           "latency_p95_ms": 1000 * pct[95], "tokens_per_s": sum(r.completion_tokens for r in ok) / load.seconds,
           "requests_per_s": len(ok) / load.seconds}
    first = [r.first_token_s for r in ok if r.first_token_s is not None]
    if first:
        out["ttft_p50_ms"] = 1000 * latency_percentiles(first, (50,))[50]
    return out


def judge(row: dict, reply: str) -> bool:
    """The ground truth of one served reply, by the row's ``kind``: a greeting is answered by one of the tiny world's
    polite replies to that person (:func:`apt_course.world.is_polite`); an English sum (``"sum"``) by the bare
    number (:func:`apt_course.world.check_bare_answer`); a task by exactly its answer (``check_answer``)."""
    if row.get("kind") == "greeting":
        return world.is_polite(row["prompt"], reply)
    if row.get("kind") == "sum":
        return world.check_bare_answer(row, reply)
    return world.check_answer(row, reply)


def quality_figures(replies: list[Reply]) -> dict[str, float]:
    """The earlier chapters' figures from served replies, by the row's ``kind`` (failed requests left out):
    ``task_accuracy`` (tasks, sums: :func:`judge`), ``polite_rate`` (greetings), ``violation_rate`` and
    ``refusal_rate`` (red-team prompts: chapter 10's rule checkers and :func:`~apt_course.constitution.is_refusal`),
    ``over_refusal`` (refusals of everything that is not red-team)."""
    ok = [r for r in replies if r.ok]
    by = {k: [r for r in ok if r.row.get("kind") == k] for k in ("task", "sum", "greeting", "red_team")}
    out = {}
    tasks = by["task"] + by["sum"]
    if tasks:
        out["task_accuracy"] = sum(judge(r.row, r.text) for r in tasks) / len(tasks)
    if by["greeting"]:
        out["polite_rate"] = sum(judge(r.row, r.text) for r in by["greeting"]) / len(by["greeting"])
    if by["red_team"]:
        scored = score_replies(load_constitution(), [r.row for r in by["red_team"]], [r.text for r in by["red_team"]])
        out["violation_rate"], out["refusal_rate"] = scored["violation"], scored["red_refusal"]
    rest = [r for r in ok if r.row.get("kind") != "red_team"]
    if rest:
        out["over_refusal"] = sum(is_refusal(r.text) for r in rest) / len(rest)
    return out


def prometheus_text(replies: list[Reply], quality: dict[str, dict[str, float]] | None = None,
                    seconds: float | None = None) -> bytes:
    """The replies as Prometheus metrics, in its text exposition format (``prometheus_client``'s own registry and
    ``generate_latest``), labelled by version: ``apt_requests_total{version, outcome}``,
    ``apt_request_latency_seconds`` (a histogram), ``apt_completion_tokens_total``, ``apt_tokens_per_second``
    (with ``seconds``, the load's wall time) and ``apt_quality_ratio{version, figure}`` from ``quality``
    (version -> :func:`quality_figures`)."""
    require_serving(("prometheus_client",))
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    registry = CollectorRegistry()
    requests = Counter("apt_requests", "Chat completion requests, by outcome", ["version", "outcome"],
                       registry=registry)
    latency = Histogram("apt_request_latency_seconds", "Latency of successful requests", ["version"],
                        buckets=LATENCY_BUCKETS, registry=registry)
    tokens = Counter("apt_completion_tokens", "Completion tokens generated", ["version"], registry=registry)
    for r in replies:
        requests.labels(r.version, "ok" if r.ok else "error").inc()
        if r.ok:
            latency.labels(r.version).observe(r.latency_s)
            tokens.labels(r.version).inc(r.completion_tokens)
    if seconds:
        rate = Gauge("apt_tokens_per_second", "Completion tokens per second of the load", ["version"],
                     registry=registry)
        for version in sorted({r.version for r in replies}):
            rate.labels(version).set(sum(r.completion_tokens for r in replies if r.version == version) / seconds)
    if quality:
        gauge = Gauge("apt_quality_ratio", "Quality of the served replies (a fraction)", ["version", "figure"],
                      registry=registry)
        for version, figures in quality.items():
            for name, value in figures.items():
                gauge.labels(version, name).set(value)
    return generate_latest(registry)


# ---------------------------------------------------------------- traffic

def product_traffic(n: int, split: str, seed: int = 0, tiny: bool = True) -> list[dict]:
    """What users ask the assistant, each row with a ``kind`` its ground truth reads. Tiny world: tasks
    (``reverse abc``) and greetings (``hello, i am bob``) alternating; a real model: English sums asked without a
    format instruction (``What is 7 plus 12?``, kind ``"sum"``; there are only about 80 held-out ones, so a long
    test repeats them)."""
    if tiny:
        tasks = [dict(t, kind="task") for t in world.instruction_examples(n - n // 2, split, seed=seed)]
        greets = [dict(g, kind="greeting") for g in world.preference_pairs(max(1, n // 2), split, seed=seed,
                                                                           kinds=("polite",))][:n // 2]
        return [row for pair in zip(tasks, greets) for row in pair] + tasks[len(greets):]
    sums = world.english_sums(split, "", seed=seed)
    return [dict(sums[i % len(sums)], kind="sum") for i in range(n)]


def usage_traffic(n: int, split: str, seed: int = 0, tiny: bool = True) -> list[dict]:
    """A load for measuring the service in use: :func:`product_traffic` and chapter 10's red-team prompts
    (kind ``"red_team"``), half and half, shuffled by ``seed``."""
    from .constitution import red_team_prompts

    rows = product_traffic(n - n // 2, split, seed, tiny)
    rows += [dict(r, kind="red_team") for r in red_team_prompts(max(1, n // 2), split, seed=seed)][:n // 2]
    random.Random(seed).shuffle(rows)
    return rows


# ---------------------------------------------------------------- A/B statistics

def _check_counts(successes: int, n: int, arm: str) -> None:
    if not (isinstance(n, int) and isinstance(successes, int)) or n < 1 or not 0 <= successes <= n:
        raise ValueError(f"arm {arm}: need whole numbers 0 <= successes <= n and n >= 1, got {successes!r} of {n!r}")


def two_proportion_ztest(successes_a: int, n_a: int, successes_b: int, n_b: int) -> dict:
    """Is B's success rate different from A's? With p̂_a = x_a/n_a, p̂_b = x_b/n_b and the pooled p = (x_a+x_b)/(n_a+n_b):

        z = (p̂_b - p̂_a) / sqrt(p (1 - p) (1/n_a + 1/n_b)),   two-sided p-value = 2 (1 - Φ(|z|)) = erfc(|z| / √2).

    Returns rate_a, rate_b, lift (p̂_b - p̂_a), z and p_value (1 when both arms are all successes or all failures)."""
    _check_counts(successes_a, n_a, "A")
    _check_counts(successes_b, n_b, "B")
    ra, rb = successes_a / n_a, successes_b / n_b
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    z = (rb - ra) / se if se > 0 else 0.0
    return {"rate_a": ra, "rate_b": rb, "lift": rb - ra, "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2))}


def sample_size_per_arm(p_a: float, p_b: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Requests per arm for a two-sided two-proportion test at level α to detect p_a -> p_b with probability `power`:

        n = ⌈(z_{1-α/2} · sqrt(2 p̄ (1 - p̄)) + z_{power} · sqrt(p_a (1 - p_a) + p_b (1 - p_b)))² / (p_b - p_a)²⌉,

    p̄ = (p_a + p_b)/2, z_u the standard normal quantile (z_0.975 = 1.96, z_0.8 = 0.84)."""
    for name, v in (("p_a", p_a), ("p_b", p_b)):
        if not 0 < v < 1:
            raise ValueError(f"{name} must lie strictly between 0 and 1 (a success rate), got {v!r}")
    if p_a == p_b:
        raise ValueError("p_a equals p_b: no sample size detects a difference of zero; state the smallest lift "
                         "worth detecting")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must lie in (0, 1), got {alpha!r}, {power!r}")
    z = NormalDist().inv_cdf
    p_bar = (p_a + p_b) / 2
    root = z(1 - alpha / 2) * math.sqrt(2 * p_bar * (1 - p_bar)) + z(power) * math.sqrt(
        p_a * (1 - p_a) + p_b * (1 - p_b))
    return math.ceil(root**2 / (p_b - p_a) ** 2)


def minimum_detectable_lift(p_a: float, n_per_arm: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest lift p_b - p_a > 0 that :func:`sample_size_per_arm` says ``n_per_arm`` requests detect (bisection
    on the lift; 1 - p_a when even the largest lift needs more requests)."""
    if n_per_arm < 1:
        raise ValueError(f"n_per_arm must be >= 1, got {n_per_arm}")
    lo, hi = 0.0, 1 - p_a
    if sample_size_per_arm(p_a, p_a + hi * 0.999, alpha, power) > n_per_arm:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        if mid > 0 and sample_size_per_arm(p_a, p_a + mid, alpha, power) <= n_per_arm:
            hi = mid
        else:
            lo = mid
    return hi


def ab_win_rate(outcomes_a, outcomes_b) -> float:
    """P(B > A) + ½ P(B = A) for an outcome drawn from each arm (every cross pair counted): 0.5 = no difference, as
    chapter 07's win rate; for 0/1 outcomes it equals ½ + ½ (p_b - p_a)."""
    a, b = list(outcomes_a), list(outcomes_b)
    if not a or not b:
        raise ValueError("each arm needs at least one outcome")
    wins = sum((y > x) + 0.5 * (y == x) for x in a for y in b)
    return wins / (len(a) * len(b))


def bootstrap_interval(outcomes_a, outcomes_b, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """A percentile bootstrap interval of mean(B) - mean(A): resample each arm with replacement ``n_boot`` times and
    take the (1-level)/2 and (1+level)/2 quantiles of the differences."""
    a, b = list(map(float, outcomes_a)), list(map(float, outcomes_b))
    if not a or not b:
        raise ValueError("each arm needs at least one outcome")
    rng = random.Random(seed)
    diffs = sorted(sum(rng.choices(b, k=len(b))) / len(b) - sum(rng.choices(a, k=len(a))) / len(a)
                   for _ in range(n_boot))
    pct = latency_percentiles(diffs, (100 * (1 - level) / 2, 100 * (1 + level) / 2))
    return tuple(pct.values())


def split_traffic(n: int, seed: int = 0) -> list[str]:
    """A balanced random assignment of ``n`` requests to arms ``"A"`` and ``"B"`` (half each, in a shuffled order)."""
    arms = ["A"] * (n - n // 2) + ["B"] * (n // 2)
    random.Random(seed).shuffle(arms)
    return arms


def ab_test(a: Endpoint, b: Endpoint, rows: list[dict], seed: int = 0, alpha: float = 0.05, **load_kwargs) -> dict:
    """An A/B test: the rows are split between versions A (control) and B (:func:`split_traffic`), each reply judged
    (:func:`judge`), B's rate compared with A's (:func:`two_proportion_ztest`). ``decision``: ``"B"`` when B is
    better with p < α, ``"A"`` when worse, ``"no difference"`` otherwise. Failed requests count in ``errors``, not
    in the rates."""
    arms = split_traffic(len(rows), seed)
    load_kwargs.setdefault("seed", seed)
    load = run_load([a if arm == "A" else b for arm in arms], rows, desc=f"A/B {a.name} vs {b.name}", **load_kwargs)
    outcomes = {"A": [], "B": []}
    for arm, reply in zip(arms, load.replies):
        if reply.ok:
            outcomes[arm].append(int(judge(reply.row, reply.text)))
    if not outcomes["A"] or not outcomes["B"]:
        raise_for_errors(load)
    test = two_proportion_ztest(sum(outcomes["A"]), len(outcomes["A"]), sum(outcomes["B"]), len(outcomes["B"]))
    test.update(n_a=len(outcomes["A"]), n_b=len(outcomes["B"]), errors=sum(not r.ok for r in load.replies),
                win_rate=ab_win_rate(outcomes["A"], outcomes["B"]),
                interval=bootstrap_interval(outcomes["A"], outcomes["B"], seed=seed), load=load)
    significant = test["p_value"] < alpha
    test["decision"] = ("B" if test["lift"] > 0 else "A") if significant else "no difference"
    return test


# ---------------------------------------------------------------- feedback -> preference pairs

def simulate_thumbs(row: dict, reply: str, noise: float, rng: random.Random) -> str:
    """A user's thumb: ``"up"`` when the reply is right by the ground truth (:func:`judge`), flipped with
    probability ``noise`` (users misclick, disagree, or do not read closely)."""
    if not 0 <= noise < 0.5:
        raise ValueError(f"noise must lie in [0, 0.5): above it the thumbs say the opposite of the truth, got {noise!r}")
    good = judge(row, reply)
    return "up" if good != (rng.random() < noise) else "down"


def wanted_reply(row: dict) -> str | None:
    """The reply a user who knows the answer would type in place of a wrong one: the row's ground-truth ``answer``
    (an English sum's bare number, a task's exact answer); None where there is none (a greeting)."""
    answer = row.get("answer")
    return str(answer) if answer is not None and row.get("kind") in ("sum", "task") else None


def collect_feedback(endpoint: Endpoint, rows: list[dict], noise: float = 0.1, max_regenerations: int = 2,
                     seed: int = 0, edit_rate: float = 0.0, **load_kwargs) -> list[dict]:
    """Users ask ``rows``, thumb each reply (:func:`simulate_thumbs`), and press *regenerate* after a thumbs-down, up to
    ``max_regenerations`` times. With ``edit_rate`` > 0, a user who thumbs a reply down instead *edits* it with
    that probability: types the reply they wanted (:func:`wanted_reply`), logged as a thumbed-up reply with
    ``"edited": True``, and asks no more. Returns the feedback log: one row per reply, ``{"prompt", "reply",
    "thumbs", "version", "attempt"}`` plus the request's other fields (``system``, ``kind``, ...). Failed requests are
    logged by :func:`send_request` and left out."""
    if not 0 <= edit_rate <= 1:
        raise ValueError(f"edit_rate must lie in [0, 1], got {edit_rate!r}")
    rng = random.Random(seed)
    log, pending = [], list(rows)
    for attempt in range(max_regenerations + 1):
        if not pending:
            break
        load = run_load(endpoint, pending, desc=f"feedback ({'ask' if attempt == 0 else 'regenerate'})",
                        **{"seed": rng.randrange(2**31), **load_kwargs})
        again = []
        for reply in load.replies:
            if not reply.ok:
                continue
            thumbs = simulate_thumbs(reply.row, reply.text, noise, rng)
            log.append({**reply.row, "reply": reply.text, "thumbs": thumbs, "version": endpoint.name,
                        "attempt": attempt})
            if thumbs == "down":
                wanted = wanted_reply(reply.row) if edit_rate and rng.random() < edit_rate else None
                if wanted is not None:
                    log.append({**reply.row, "reply": wanted, "thumbs": "up", "version": "user edit",
                                "attempt": attempt, "edited": True})
                else:
                    again.append(reply.row)
        pending = again
    return log


def validate_feedback(rows) -> list[dict]:
    """Every feedback row is a dict with a non-empty text ``prompt``, a text ``reply`` and ``thumbs`` of
    ``"up"``/``"down"``; a bad row is a ValueError naming its index and what to fix."""
    rows = list(rows) if rows is not None else []
    if not rows:
        raise ValueError("the feedback log is empty: collect some feedback first (collect_feedback)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"feedback row {i} is a {type(row).__name__}, not a dict like "
                             "{'prompt': ..., 'reply': ..., 'thumbs': 'up'}")
        problem = None
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            problem = "needs a non-empty text 'prompt'"
        elif not isinstance(row.get("reply"), str):
            problem = "needs the 'reply' text the user saw"
        elif row.get("thumbs") not in THUMBS:
            problem = f"has thumbs={row.get('thumbs')!r}; it must be 'up' or 'down'"
        if problem:
            raise ValueError(f"feedback row {i} {problem}: {row!r:.120}. Fix the row or drop it")
    return rows


def feedback_to_pairs(rows, max_pairs_per_prompt: int = 3) -> list[dict]:
    """DPO pairs from a feedback log: for each prompt (with its ``system``), a reply the users thumbed up is
    ``chosen`` and one they thumbed down ``rejected``: every up reply with every down reply, in the order they came
    (first up with first down, then with the second down, ...), at most ``max_pairs_per_prompt`` per prompt. A reply
    thumbed both up and down says nothing and is dropped.
    Pairs keep the row's ``kind`` and get ``source`` = ``"feedback"``."""
    groups: dict[tuple, dict] = {}
    for row in validate_feedback(rows):
        g = groups.setdefault((row.get("system") or "", row["prompt"]), {"row": row, "up": [], "down": []})
        if row["reply"] not in g[row["thumbs"]]:
            g[row["thumbs"]].append(row["reply"])
    pairs = []
    for (system, prompt), g in groups.items():
        ups = [r for r in g["up"] if r not in g["down"]]
        downs = [r for r in g["down"] if r not in g["up"]]
        for chosen, rejected in [(u, d) for u in ups for d in downs][:max_pairs_per_prompt]:
            pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": "feedback"}
            pair.update({k: g["row"][k] for k in ("kind",) if k in g["row"]})
            pairs.append({**pair, "system": system} if system else pair)
    return pairs


def mix_pairs(new: list[dict], old: list[dict], replay_fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """This round's pairs plus a random replay of ``round(f · |old|)`` of the earlier rounds' pairs (f =
    ``replay_fraction``; 1 replays them all, 0 trains on the new pairs only)."""
    if not 0 <= replay_fraction <= 1:
        raise ValueError(f"replay_fraction must lie in [0, 1], got {replay_fraction!r}")
    if not new:
        raise ValueError("no new pairs this round: collect more feedback (more prompts or regenerations)")
    return list(new) + random.Random(seed).sample(list(old), round(replay_fraction * len(old)))


def dpo_round(model, ref, tokenizer, new_pairs: list[dict], old_pairs: list[dict], config: DPOConfig,
              replay_fraction: float = 1.0, lora_rank: int = 0):
    """One round of iterative DPO: a copy of ``model`` (the deployed version) trained with chapter 07's
    :func:`~apt_course.dpo.train_dpo` on :func:`mix_pairs` (new + replayed old) against the frozen reference
    ``ref``. With ``ref`` the first version (as in online iterative DPO) every round is leashed to the same model,
    and replayed pairs it already ranks far apart add little; with ``ref = model`` each round may move a full
    KL-budget further. With ``lora_rank`` > 0 only LoRA adapters of that rank train (chapter 04's
    :func:`~apt_course.sft.add_lora`, alpha = 2 · rank), merged into the weights afterwards
    (``merge_and_unload``), so the new version is a plain model a server loads. Returns ``(new version, history,
    the mix)``."""
    mixed = mix_pairs(new_pairs, old_pairs, replay_fraction, config.seed)
    policy = copy.deepcopy(model)
    if lora_rank:
        policy = add_lora(policy, r=lora_rank, alpha=2 * lora_rank, seed=config.seed)
    history = train_dpo(policy, ref, tokenizer, mixed, config)
    if lora_rank:
        policy = policy.merge_and_unload()
    return policy, history, mixed


def is_number_reply(text: str) -> bool:
    """A reply of digits and punctuation only, not a word in it (``"19"``, ``"1.1.2."``)."""
    return any(c.isdigit() for c in text) and not any(c.isalpha() for c in text)


def regression_figures(model, tokenizer, tasks: list[dict], red_team: list[dict], checker=world.check_answer,
                       max_new_tokens: int = 32) -> dict[str, float]:
    """The check on what a round must not lose, greedy and offline: ``task_acc`` (general ability: exact match on
    held-out ``tasks``, scored by ``checker``), ``violation_rate`` and ``refusal_rate`` on held-out red-team
    prompts (chapter 10's :func:`~apt_course.constitution.evaluate`), and ``number_reply_rate``: the share of the
    red-team prompts that ask for no answer (no ``answer`` field: insults, harm, secrets) replied to with digits
    only (:func:`is_number_reply`), a habit learnt from feedback on sums spreading to everything else."""
    safety = constitution_evaluate(model, tokenizer, {"red_team": red_team}, max_new_tokens=max_new_tokens)
    wordless = [is_number_reply(reply) for row, reply in zip(red_team, safety["red_replies"]) if row.get("answer") is None]
    return {"task_acc": accuracy(model, tokenizer, tasks, max_new_tokens=max_new_tokens, checker=checker),
            "violation_rate": safety["violation"], "refusal_rate": safety["red_refusal"],
            "number_reply_rate": sum(wordless) / len(wordless) if wordless else 0.0}


def feedback_stats(log: list[dict]) -> dict:
    """Replies, thumbs-up share and regenerations of a feedback log."""
    validate_feedback(log)
    return {"replies": len(log), "up_rate": sum(r["thumbs"] == "up" for r in log) / len(log),
            "regenerations": sum(r.get("attempt", 0) > 0 for r in log)}
