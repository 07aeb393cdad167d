"""A real two-node SLURM cluster on one host, for tests: munged, slurmctld, and two slurmd.

Everything lives in a fresh directory: its own munge key and socket, a ``slurm.conf`` with two fake
nodes (``node1``, ``node2``) that both resolve to 127.0.0.1 on distinct ports, state and spool dirs,
logs. Clients (``srun``, ``sbatch``, ``sinfo``) find it through ``SLURM_CONF`` in :meth:`env`.

Daemons run in the foreground as children of the test, so they are stopped by their own PIDs. Job
processes that slurmd forked (slurmstepd, the tasks) are found by a marker variable that only this
cluster's environment carries, and killed by PID too: a failed test never leaves a daemon or a rank
behind.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["SlurmCluster", "missing_slurm_binaries"]

BINARIES = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "sinfo")
MARKER = "SOAA_TEST_SLURM_ROOT"


def missing_slurm_binaries() -> list[str]:
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    try:
        pwd.getpwnam("munge")
    except KeyError:
        missing.append("user 'munge'")
    return missing


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class SlurmCluster:
    """Start with :meth:`start`, always :meth:`stop` in a ``finally`` (or use it as a context manager)."""

    def __init__(self, nodes: tuple[str, ...] = ("node1", "node2"), cpus_per_node: int = 2) -> None:
        self.nodes = nodes
        self.cpus = cpus_per_node
        # Not pytest's tmp_path: that is mode 0700 and the munge user must reach its own subdirectory.
        self.root = Path(tempfile.mkdtemp(prefix="soaa-slurm-"))
        os.chmod(self.root, 0o755)
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[object] = []

    # ------------------------------------------------------------------ environment
    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """``base`` (default: this process's environment) pointed at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env[MARKER] = str(self.root)
        for k in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
            env.pop(k, None)
        env.update(extra)
        return env

    # ------------------------------------------------------------------ start
    def _write_config(self) -> None:
        munge = self.root / "munge"
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        # slurmctld checks SlurmctldHost against its own *short* host name
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=soaatest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge / 'munge.socket'}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}/%n",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd'}.%n.pid",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd'}.%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "InactiveLimit=0",
            "KillWait=2",
            "MinJobAge=5",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        for n in self.nodes:
            (self.root / "spool" / n).mkdir()

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir()
        munge.chmod(0o711)  # munged: the socket directory must be searchable by every client
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        pw = pwd.getpwnam("munge")
        for p in (munge, key):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        cmd = [_which("munged"), "-F", f"--socket={munge / 'munge.socket'}", f"--key-file={key}",
               f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
               f"--seed-file={munge / 'munged.seed'}", "--num-threads=2"]
        self._spawn("munged", cmd, user=pw.pw_uid, group=pw.pw_gid)
        self._wait_for(lambda: (munge / "munge.socket").exists(), "munged socket", 15)

    def _spawn(self, name: str, cmd: list[str], **kw: object) -> None:
        log = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            cwd=self.root, start_new_session=True, **kw)  # type: ignore[call-overload]

    def _wait_for(self, ok, what: str, timeout: float) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}\n"
                                       + self.diagnostics())
            if ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n" + self.diagnostics())

    def node_states(self) -> dict[str, str]:
        try:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env(), capture_output=True,
                                 text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return {}
        states = {}
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        self._write_config()
        self._start_munge()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        self._wait_for(lambda: all(self.node_states().get(n) == "idle" for n in self.nodes),
                       "both nodes idle", timeout)
        return self

    # ------------------------------------------------------------------ stop
    def _job_pids(self) -> list[int]:
        """Processes (slurmstepd, tasks) whose environment carries this cluster's marker."""
        needle = f"{MARKER}={self.root}".encode()
        own = {p.pid for p in self.procs.values()} | {os.getpid()}
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in own:
                continue
            try:
                environ = (d / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                pids.append(int(d.name))
        return pids

    def stop(self) -> None:
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name in order:
            p = self.procs.get(name)
            if p is None:
                continue
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for pid in self._job_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def diagnostics(self) -> str:
        out = []
        logs = sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out"))
        for f in logs + [self.root / "munge" / "munged.log"]:
            try:
                out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
            except OSError:
                pass
        return "\n".join(out)


def main() -> None:
    """Start a toy cluster and keep it up until Ctrl-C: ``python -m tests.multinode.slurm_cluster``."""
    missing = missing_slurm_binaries()
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install slurm-wlm munge)")
    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # explicit handlers: a background job starts with SIGINT ignored, and SIGTERM must clean up too
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with SlurmCluster() as cluster:
        print(f"two-node SLURM cluster up ({cluster.node_states()}).\n"
              f"In another shell:  export SLURM_CONF={cluster.conf} MASTER_ADDR=127.0.0.1\n"
              "Ctrl-C (or SIGTERM) stops every daemon.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
