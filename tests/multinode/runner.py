"""Run ``multinode_examples/train.py`` under a launcher and compare ranks with a single-process run.

One launch can train several optimizers (``--optimizer a,b`` or ``all``, each under ``out_dir/<name>/``):
process start-up and the rendezvous cost seconds, the runs milliseconds, so tests share a launch
(:class:`Once`) and compare each optimizer's results separately.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")

#: extra seconds a launch may take per optimizer beyond its first: the training is milliseconds, but a
#: loaded CI machine can stall any process for seconds
PER_OPTIMIZER_S = 30.0

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "multinode_examples"
TRAIN = EXAMPLES / "train.py"

#: launcher variables that must not leak from the test's own environment (CI may run under SLURM)
_LAUNCH_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "TORCHELASTIC_")
_LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_KEYS and not k.startswith(_LAUNCH_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def train_module() -> Any:
    """``multinode_examples/train.py`` imported as a module (it is not a package), to run in-process."""
    spec = importlib.util.spec_from_file_location("lsoaa_example_train", TRAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_args(optimizer: str, out_dir: Path, steps: int = 12, extra: tuple[str, ...] = ()) -> list[str]:
    return [str(TRAIN), "--optimizer", optimizer, "--steps", str(steps), "--global-batch", "16",
            "--out-dir", str(out_dir), *extra]


#: Open MPI's own runtime failing before any rank starts (seen once in CI, under load: its PMIx server's
#: socket thread did not start); nothing of this project's ran, so such a launch is tried once more
MPI_RUNTIME_NOT_STARTED = "PMIx server's listener thread failed to start"


def run_once_more_if_mpi_runtime_failed(cmd: list[str], *, env: dict[str, str], timeout: float,
                                        cwd: Path | None = None) -> tuple[int, str]:
    """Exit status and output of ``cmd``; a launch still running after ``timeout`` is killed (its whole
    process group) and fails the test as hung. A launch whose MPI runtime did not start is run again, once."""
    for attempt in (0, 1):
        proc = subprocess.Popen(cmd, env=env, cwd=cwd or REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, _ = proc.communicate(timeout=10)
            tail = out.decode(errors="replace")[-4000:]
            raise AssertionError(f"hung: still running after {timeout}s: {' '.join(cmd)}\n{tail}") from None
        text = out.decode(errors="replace")
        if proc.returncode == 0 or MPI_RUNTIME_NOT_STARTED not in text or attempt:
            return proc.returncode, text
    raise AssertionError("unreachable")


def run(cmd: list[str], *, env: dict[str, str], timeout: float, cwd: Path | None = None) -> str:
    """Run a command; on failure or timeout raise with its output (the process group is killed)."""
    returncode, text = run_once_more_if_mpi_runtime_failed(cmd, env=env, timeout=timeout, cwd=cwd)
    if returncode != 0:
        raise AssertionError(f"exit {returncode}: {' '.join(cmd)}\n{text[-4000:]}")
    return text


def launch_timeout(base: float, optimizers: int) -> float:
    """The timeout of a launch that trains ``optimizers`` optimizers, ``base`` being that of one."""
    return base + PER_OPTIMIZER_S * (optimizers - 1)


def single_process(optimizers: Sequence[str], out_dir: Path,
                   extra: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The one-process reference of every optimizer named, from one process: name -> its result."""
    run([sys.executable, *train_args(",".join(optimizers), out_dir, extra=extra)], env=clean_env(),
        timeout=launch_timeout(120, len(optimizers)))
    return {name: ranks[0] for name, ranks in load_each(out_dir, 1, optimizers).items()}


def load_each(out_dir: Path, world_size: int, optimizers: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Every rank's results of each optimizer of one launch: ``out_dir/<name>/`` when it trained several,
    ``out_dir`` itself for one (train.py's layout)."""
    if len(optimizers) == 1:
        return {optimizers[0]: load(out_dir, world_size)}
    results = {name: load(out_dir / name, world_size) for name in optimizers}
    for name, ranks in results.items():
        assert all(r["optimizer"] == name for r in ranks), (name, [r["optimizer"] for r in ranks])
    return results


class Once(Generic[T]):
    """A launch several tests share: it runs on first use; every later caller gets the same value or, if
    it failed, an AssertionError with the same message (the launcher's output), so each test of that
    launcher fails rather than passing or skipping. ``pytest.skip`` (not an Exception) is not cached."""

    def __init__(self, launch: Callable[[], T]) -> None:
        self._launch = launch
        self._result: tuple[T] | None = None
        self._failure: str | None = None

    def __call__(self) -> T:
        if self._failure is not None:
            raise AssertionError(f"the launch shared by this test failed (in an earlier test):\n{self._failure}")
        if self._result is None:
            try:
                self._result = (self._launch(),)
            except Exception as e:
                self._failure = f"{type(e).__name__}: {e}"
                raise
        return self._result[0]


def load(out_dir: Path, world_size: int) -> list[dict[str, Any]]:
    results = []
    for r in range(world_size):
        res = json.loads((out_dir / f"result_rank{r}.json").read_text())
        res["params"] = torch.load(out_dir / f"params_rank{r}.pt", weights_only=True)
        results.append(res)
    return results


def assert_matches_single(ranks: list[dict[str, Any]], single: dict[str, Any], *, launcher: str,
                          rtol: float = 1e-9, atol: float = 1e-11) -> None:
    """Every rank holds the same final parameters, equal to the single-process run of the global batch."""
    world = len(ranks)
    assert single["launcher"] == "single" and single["world_size"] == 1
    assert sorted(r["rank"] for r in ranks) == list(range(world))
    for r in ranks:
        assert r["launcher"] == launcher, r["launcher"]
        assert r["world_size"] == world
        assert r["steps"] == single["steps"] and r["optimizer"] == single["optimizer"]
    # the ranks split the global batch into disjoint slices (a rank training on everything would also
    # match the reference, so the partition is checked explicitly)
    slices = sorted(tuple(r["local_samples"]) for r in ranks)
    n = single["global_batch"]
    assert slices == [(i * n // world, (i + 1) * n // world) for i in range(world)], slices
    ref = single["params"]
    for r in ranks:
        assert r["params"].keys() == ref.keys()
        for k in ref:
            # replicas are copies of the owners' blocks: bit-identical across ranks
            assert torch.equal(r["params"][k], ranks[0]["params"][k]), f"rank {r['rank']} differs on {k}"
            torch.testing.assert_close(r["params"][k], ref[k], rtol=rtol, atol=atol,
                                       msg=lambda m, k=k: f"{launcher} W={world} vs single, {k}: {m}")
    # training really happened (the loss went down) and the logged global loss follows the reference
    assert min(single["losses"][1:]) < single["losses"][0], single["losses"]
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single["losses"]),
                               rtol=1e-8, atol=1e-12)


def run_together(cmds: list[tuple[list[str], dict[str, str]]], *, timeout: float) -> list[str]:
    """Start several commands at once (e.g. one torchrun per host), wait for all; kill all on failure."""
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True) for cmd, env in cmds]
    outs: list[str] = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)  # the slowest one bounds the total
            outs.append(out.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"timed out after {timeout}s:\n" + "\n".join(" ".join(c) for c, _ in cmds)) from None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(10)
    bad = [(c, p.returncode, o) for (c, _), p, o in zip(cmds, procs, outs) if p.returncode != 0]
    if bad:
        raise AssertionError("\n".join(f"exit {rc}: {' '.join(c)}\n{o[-3000:]}" for c, rc, o in bad))
    return outs
