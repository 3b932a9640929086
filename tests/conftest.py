"""Shared fixtures: one `tiny` world per session, thread and state hygiene, subprocesses; the
bundle and server fixtures in tests/fixtures/ (registered below).

Test modules never import each other: what two modules share lives here, or in their
package's own conftest.py, as fixtures (a helper is a fixture that returns the callable).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# One math-library thread unless the caller says otherwise (set before torch, numpy or faiss
# start a pool): the suite's models are tiny, and on a shared 2-core machine a second thread
# mostly spins against the other processes (a tiny coarse training: 11 s of CPU with one
# thread, 70 s with two). `OMP_NUM_THREADS=2 make test` runs the suite with two.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from recstack.training import checkpoint  # noqa: E402
from recstack.training.checkpoint import TrainingState  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # a hung collective fails the test instead of the CI job

# fixtures kept in modules of their own, registered for the whole suite
pytest_plugins = ["tests.fixtures.bundles", "tests.fixtures.servers"]


# --- test order ------------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter, config):
    """A shuffled run (`make test-shuffled`, or `-p randomly`) names its seed even under -q,
    so that a failure in one order can be replayed: `-p randomly --randomly-seed=SEED`."""
    if config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"test order shuffled by pytest-randomly, seed {config.getoption('randomly_seed')}"
                                    f" (replay: -p randomly --randomly-seed={config.getoption('randomly_seed')})")


# --- process-wide state: every test starts and ends with the same ---------------------------


def _global_state() -> dict:
    return {"torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
            "cwd": os.getcwd(), "env": dict(os.environ)}


def _restore(before: dict) -> None:
    """Put back what library code may have changed for the whole process: torch's and FAISS's
    thread counts (the trainers, benches and the serving cascade set them), the working
    directory and the environment. Leaked, they make a test's numbers depend on which tests
    ran before it."""
    if torch.get_num_threads() != before["torch_threads"]:
        torch.set_num_threads(before["torch_threads"])
    if faiss.omp_get_max_threads() != before["faiss_threads"]:
        faiss.omp_set_num_threads(before["faiss_threads"])
    if os.getcwd() != before["cwd"]:
        os.chdir(before["cwd"])
    if dict(os.environ) != before["env"]:
        os.environ.clear()
        os.environ.update(before["env"])


_THREADS_AT_START = (torch.get_num_threads(), faiss.omp_get_max_threads())


@pytest.hookimpl(wrapper=True)  # around pytest's own hooks, so that they count the error
def pytest_collectreport(report):
    """A test module that sets torch's or FAISS's thread count when imported would set it for
    the whole session (the per-test restore below starts from the count collection left): it
    is a collection error that names the module."""
    now = (torch.get_num_threads(), faiss.omp_get_max_threads())
    if now != _THREADS_AT_START and report.passed:
        torch.set_num_threads(_THREADS_AT_START[0])
        faiss.omp_set_num_threads(_THREADS_AT_START[1])
        report.outcome = "failed"
        report.longrepr = (f"{report.nodeid}: importing it changed the (torch, faiss) thread counts from "
                           f"{_THREADS_AT_START} to {now} for the whole session; set them in a fixture instead")
    return (yield)


@pytest.fixture(scope="module", autouse=True)
def _module_state():
    """What a module's fixtures change is given back when the module ends."""
    before = _global_state()
    yield
    _restore(before)


@pytest.fixture(autouse=True)
def _test_state():
    """What a test changes is given back when it ends (its module's settings stay in force)."""
    before = _global_state()
    yield
    _restore(before)


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for the module's tests (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- data ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """Path to a simulated `tiny` world (seed 0)."""
    from recstack.world import preset, simulate

    out = tmp_path_factory.mktemp("tiny_world")
    simulate(preset("tiny"), seed=0, out=out, preset="tiny", progress=False)
    return str(out)


@pytest.fixture(scope="session")
def consent_world(tmp_path_factory) -> str:
    """Path to a `tiny` world (seed 0) where half the users consent to conversion tracking
    (read-only: the signal-loss fits and experiments read it, their outputs go elsewhere)."""
    from recstack.config import apply_overrides
    from recstack.world import preset, simulate

    out = tmp_path_factory.mktemp("tiny_consent")
    simulate(apply_overrides(preset("tiny"), ["consent_rate=0.5"]), seed=0, out=out, preset="tiny", progress=False)
    return str(out)


@pytest.fixture(scope="session")
def tiny4_world(tmp_path_factory) -> str:
    """Path to a `tiny` world of 4 days (scored days 2-4), seed 0, consent at 0.5 following the
    age bucket: the streaming protocol's smallest world (read-only)."""
    from recstack.config import apply_overrides
    from recstack.world import preset, simulate

    out = tmp_path_factory.mktemp("tiny4")
    cfg = apply_overrides(preset("tiny"), ["n_days=4", "consent_rate=0.5", "consent_age_slope=1.5"])
    simulate(cfg, seed=0, out=out, preset="tiny", progress=False)
    return str(out)


# --- subprocesses and training -------------------------------------------------------------


def _launch(args: list[str], tmp_path: Path, n: int = 2, timeout: float = TIMEOUT_S) -> list[str]:
    """Run `python ARGS` as n ranks (torchrun's environment, file:// rendezvous); -> outputs.
    Fails the test if a rank fails or the job outlives `timeout`."""
    rdzv = tmp_path / f"rendezvous-{os.getpid()}-{len(list(tmp_path.iterdir()))}"
    env = dict(os.environ, WORLD_SIZE=str(n), RECSTACK_DIST_INIT_METHOD=f"file://{rdzv}", GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    procs = [subprocess.Popen([sys.executable, *args], cwd=REPO, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(n)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{out[-4000:]}"
    return outs


@pytest.fixture(scope="session")
def launch():
    """Callable (args, tmp_path, n=2, timeout=TIMEOUT_S) -> outputs: `python ARGS` as n DDP ranks."""
    return _launch


class Killed(Exception):
    """A training run stopped by the `kill_at` fixture, as if the process had been killed."""


def _same_tensors(a: dict, b: dict) -> bool:
    flat = lambda d: {f"{k}/{kk}": vv for k, v in d.items() for kk, vv in v.items()} if isinstance(
        next(iter(d.values())), dict) else d
    a, b = flat(a), flat(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _final_model(out: Path, stage: str) -> dict:
    return checkpoint.load(out / "checkpoint.pt", stage=stage)["model"]


@pytest.fixture
def kill_at(monkeypatch):
    """Callable (phase, step) -> the (phase, step) log: training raises `kill_at.Killed` right
    after optimiser step `step` of phase `phase` (no snapshot is written there, as in a real kill)."""

    def at(phase: int, step: int) -> list:
        seen = []

        def hook(ph, s):
            seen.append((ph.index, s))
            if (ph.index, s) == (phase, step):
                raise Killed

        monkeypatch.setattr(TrainingState, "on_step", hook)
        return seen

    at.Killed = Killed
    return at


@pytest.fixture(scope="session")
def same_tensors():
    """Callable (a, b) -> True when two state dicts (or dicts of them) hold bit-identical tensors."""
    return _same_tensors


@pytest.fixture(scope="session")
def final_model():
    """Callable (run_dir, stage) -> the model state dict of run_dir/checkpoint.pt."""
    return _final_model
