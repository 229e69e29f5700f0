"""A one-node Slurm cluster on localhost for the `slurm` tests: munged, MariaDB, slurmdbd, slurmctld and slurmd
as plain background processes, every file under one folder, nothing written to /etc, stopped by PID.

Needs the Debian packages `slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core
mariadb-client-core` (`.ci/install-slurm`). Accounting is part of it because submitit reads job states from
`sacct`: without it a cancelled or timed-out job is never seen as finished.

    python -m tests.slurm_cluster /tmp/slurm   # start one and keep it up until Ctrl-C (prints SLURM_CONF)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sinfo", "sacct", "sbatch")


def missing_programs() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin") / name)


class LocalSlurm:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.processes: dict[str, subprocess.Popen] = {}
        self.conf = self.folder / "slurm.conf"
        self.munge_socket = self.folder / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """What every sbatch/sacct/scontrol caller needs."""
        return {"SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------ start
    def start(self, timeout: float = 60) -> LocalSlurm:
        problems = missing_programs()
        if os.geteuid() != 0:
            raise RuntimeError("a local Slurm cluster runs its daemons as root (SlurmUser=root); run as root")
        if problems:
            raise RuntimeError(f"Slurm programs not found: {problems}; run .ci/install-slurm")
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._munge()
            self._mariadb(timeout)
            self._write_configs()
            self._spawn("slurmdbd", [program("slurmdbd"), "-D"])
            self._wait(lambda: self._port_open(self.dbd_port), timeout, "slurmdbd to listen")
            self._spawn("slurmctld", [program("slurmctld"), "-D", "-i"])
            self._spawn("slurmd", [program("slurmd"), "-D"])
            self._wait(self._idle, timeout, "sinfo to show the node idle")
            self._wait(lambda: self.run("sacct", "-n", "-X").returncode == 0, timeout, "sacct to answer")
        except BaseException:
            self.stop()
            raise
        return self

    def _munge(self) -> None:
        folder = self.folder / "munge"
        folder.mkdir(exist_ok=True)
        folder.chmod(0o755)  # munged refuses a socket directory others can write to
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        command = [
            program("munged"), "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
            f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
            f"--seed-file={folder / 'munged.seed'}",
        ]  # fmt: skip
        self._spawn("munged", command)
        self._wait(self.munge_socket.exists, 20, "munged's socket")

    def _mariadb(self, timeout: float) -> None:
        data = self.folder / "mysql"
        self.db_port = free_port()
        self.db_socket = self.folder / "mysqld.sock"
        install = [
            program("mariadb-install-db"), f"--datadir={data}", "--user=root", "--skip-test-db", "--no-defaults",
            "--auth-root-authentication-method=normal",
        ]  # fmt: skip
        done = subprocess.run(install, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"mariadb-install-db failed: {done.stderr[-2000:]}")
        command = [
            program("mariadbd"), "--no-defaults", f"--datadir={data}", f"--socket={self.db_socket}",
            f"--port={self.db_port}", "--bind-address=127.0.0.1", "--user=root", "--skip-grant-tables",
            f"--pid-file={self.folder / 'mysqld.pid'}", f"--log-error={self.folder / 'mysqld.log'}",
            "--innodb-buffer-pool-size=32M",
        ]  # fmt: skip
        self._spawn("mariadbd", command)
        self._wait(lambda: self._port_open(self.db_port), timeout, "MariaDB to listen")

    def _write_configs(self) -> None:
        self.dbd_port = free_port()
        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        state = self.folder / "state"
        spool = self.folder / "spool"
        for path in (state, spool):
            path.mkdir(exist_ok=True)
        node = subprocess.run([program("slurmd"), "-C"], capture_output=True, text=True).stdout.splitlines()[0]
        name = node.split()[0].split("=", 1)[1]
        dbd = self.folder / "slurmdbd.conf"
        dbd.write_text(
            "\n".join(
                [
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    "DbdHost=localhost",
                    "DbdAddr=127.0.0.1",
                    f"DbdPort={self.dbd_port}",
                    "SlurmUser=root",
                    f"PidFile={self.folder / 'slurmdbd.pid'}",
                    f"LogFile={self.folder / 'slurmdbd.log'}",
                    "StorageType=accounting_storage/mysql",
                    "StorageHost=127.0.0.1",
                    f"StoragePort={self.db_port}",
                    "StorageUser=root",
                    "StorageLoc=slurm_acct_db",
                ]
            )
            + "\n"
        )
        dbd.chmod(0o600)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=capdiff",
                    f"SlurmctldHost={name}(127.0.0.1)",
                    f"SlurmctldPort={self.ctld_port}",
                    f"SlurmdPort={self.slurmd_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket},cred_expire=10",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "DefMemPerCPU=2000",
                    "EnforcePartLimits=ALL",
                    "MinJobAge=60",
                    "KillWait=5",
                    f"StateSaveLocation={state}",
                    f"SlurmdSpoolDir={spool}",
                    f"SlurmctldPidFile={self.folder / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.folder / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.folder / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.folder / 'slurmd.log'}",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/slurmdbd",
                    "AccountingStorageHost=localhost",
                    f"AccountingStoragePort={self.dbd_port}",
                    f"AccountingStoragePass={self.munge_socket}",  # slurmctld ignores AuthInfo for slurmdbd
                    f"{node} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )

    # ------------------------------------------------------------------- use
    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=os.environ | self.env, capture_output=True, text=True, timeout=60)

    def _idle(self) -> bool:
        done = self.run("sinfo", "-h", "-o", "%t")
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def _port_open(self, port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _spawn(self, name: str, command: list[str]) -> None:
        log = (self.folder / f"{name}.out").open("w")
        env = os.environ | self.env | {"SLURMDBD_CONF": str(self.folder / "slurmdbd.conf")}
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = {n: self._tail(n) for n in self.processes}
                raise RuntimeError(f"waiting for {what}: {'stopped: ' + str(dead) if dead else 'timed out'}\n{logs}")
            time.sleep(0.2)

    def _tail(self, name: str) -> str:
        paths = [self.folder / f"{name}.out", self.folder / f"{name}.log"]
        return " | ".join(p.read_text()[-800:] for p in paths if p.is_file())

    # ------------------------------------------------------------------- stop
    def stop(self) -> None:
        """Cancel what is left in the queue and let the node finish it, stop the daemons this object started (by
        PID, newest first), then end any job-step process left behind: a slurmstepd whose slurmd stopped
        before it could report its step done stays asleep forever (found by this cluster's SLURM_CONF)."""
        controller = self.processes.get("slurmctld")
        if controller is not None and controller.poll() is None:
            self.run("scancel", "--partition=debug")
            deadline = time.monotonic() + 60
            while self.run("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for pid in self._job_processes():
            with contextlib.suppress(ProcessLookupError):  # it may have ended by itself meanwhile
                os.kill(pid, signal.SIGKILL)

    def _job_processes(self) -> list[int]:
        """Processes started by this cluster's daemons (their environment names its SLURM_CONF)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
        return found


if __name__ == "__main__":
    cluster = LocalSlurm(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/capdiff-slurm")).start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    finally:
        cluster.stop()
