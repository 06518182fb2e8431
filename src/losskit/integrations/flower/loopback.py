"""A real Flower deployment on loopback: one SuperLink, N SuperNodes, ``flwr run``.

    python -m losskit.integrations.flower.loopback --app examples/flower-app --nodes 2 \\
        --run-config "algorithm='fedld' num-server-rounds=2" [--tls]

Every address is 127.0.0.1 (ports picked free by the OS); each process is
started in its own session (process group) and :meth:`Loopback.stop` sends
SIGTERM to each group, then SIGKILL after a grace period, so the ServerApp,
SuperExec and ClientApp subprocesses Flower spawns go with their parents.
Flower's SuperLink starts its SuperExec in a new session of its own (and that
one the ServerApp or ``flwr-simulation`` with Ray's processes), out of reach of
the group signal; so :meth:`Loopback.stop` first notes every descendant of the
processes it started (from ``/proc``, on Linux) and after the group signals
ends those still alive the same way (SIGTERM, SIGKILL after the grace period).
Flower's configuration lives in a private ``FLWR_HOME`` under the work
folder; telemetry and update checks are off (``FLWR_TELEMETRY_ENABLED=0``,
``FLWR_DISABLE_UPDATE_CHECK=1``) and the SuperLink runs with
``--disable-runtime-dependency-installation``: nothing is downloaded.

``tls=True`` makes a self-signed CA and a server certificate for
127.0.0.1/localhost (python ``cryptography``, which Flower depends on) and
runs the SuperLink with them, the SuperNodes and ``flwr`` with the CA as
root certificate, instead of ``--insecure``.

``simulation=True`` (``--simulation`` on the command line) runs the same app
under Flower's simulation engine instead: one SuperLink started with
``--simulation``, no SuperNode processes, and ``flwr run ... --federation-config
"num-supernodes=N client-resources-num-cpus=C"``; the SuperLink's
``flwr-simulation`` process runs the ClientApps in Ray actors.  It needs
``flwr[simulation]`` (Ray; ``pip install 'losskit[simulation]'``) in the
interpreter that runs this module.  Ray's session files go to
``workdir/ray`` (``RAY_TMPDIR``), or, where that path is too long for Ray's
unix sockets (107 bytes with Ray's ~70-byte session suffix), to a fresh
``/tmp/losskit-ray-*`` folder removed by :meth:`Loopback.stop`; Ray's usage
stats are off (``RAY_USAGE_STATS_ENABLED=0``).  Note: ``flwr run --stream``
exits 0 even when the simulation crashes (Flower 1.42); the launcher judges a
run by its ``result.json``.

Flower's programs start each other by name (the SuperLink runs
``flower-superexec``, which runs ``flwr-serverapp`` / ``flwr-simulation``), so
the folder of the running interpreter goes first on their ``PATH``: the whole
deployment uses this interpreter's environment.

This module imports no Flower code: it runs Flower's command-line programs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["Loopback", "make_self_signed_certificates", "free_port", "format_run_config", "simulation_available",
           "live_pids", "main"]

HOST = "127.0.0.1"
#: bytes Ray appends to RAY_TMPDIR for its longest socket ("/ray/session_<date>_<time>_<us>_<pid>/sockets/plasma_store")
RAY_SOCKET_SUFFIX = 72


def simulation_available() -> bool:
    """Whether Flower's simulation engine can run here (``ray`` importable and Flower's
    ``flwr-simulation`` program present), without importing either."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return False
    try:
        _program("flwr-simulation")
    except FileNotFoundError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, deadline: float, proc: subprocess.Popen, what: str, log: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on {HOST}:{port}; "
                               f"log {log}:\n{_tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on {HOST}:{port} in time; log {log}:\n{_tail(log)}")


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _program(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"Flower's {name!r} program was not found next to {sys.executable} or on PATH: "
                            "pip install 'losskit[flower]'")


def make_self_signed_certificates(folder: str | os.PathLike) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost, valid one day:
    ``{"ca": ca.pem, "cert": server.pem, "key": server.key}``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    later = now + _dt.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "losskit loopback CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(later)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(later)
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    os.chmod(paths["key"], 0o600)
    return paths


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def format_run_config(cfg: Mapping[str, Any]) -> str:
    """``{"algorithm": "fedld", "num-server-rounds": 2}`` -> ``algorithm="fedld" num-server-rounds=2``."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.items())


class Loopback:
    """One SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1; use as a context manager.

    ``node_configs[i]`` adds keys to node ``i``'s ``--node-config`` (besides
    ``partition-id`` and ``num-partitions``).  Logs go to ``workdir``.
    ``simulation=True``: a SuperLink in simulation mode and ``num_nodes`` virtual
    SuperNodes in Flower's simulation engine (Ray), each ClientApp given
    ``client_cpus`` of Ray's CPUs (``ray_cpus``: the CPUs Ray may use, default all);
    Flower sets each virtual node's ``partition-id`` and ``num-partitions`` itself,
    so ``node_configs`` must stay empty.
    """

    def __init__(self, num_nodes: int = 2, *, workdir: str | os.PathLike | None = None, tls: bool = False,
                 node_configs: Sequence[Mapping[str, Any]] | None = None, start_timeout: float = 60.0,
                 stop_grace: float = 10.0, simulation: bool = False, client_cpus: int = 1,
                 ray_cpus: int | None = None):
        if num_nodes < 1:
            raise ValueError(f"num_nodes: expected >= 1, got {num_nodes}")
        if simulation and node_configs:
            raise ValueError("node_configs: the simulation engine sets each virtual node's config itself "
                             f"(partition-id, num-partitions); expected none, got {list(node_configs)}")
        if client_cpus < 1 or (ray_cpus is not None and ray_cpus < client_cpus):
            raise ValueError(f"client_cpus, ray_cpus: expected 1 <= client_cpus <= ray_cpus, got {client_cpus} "
                             f"and {ray_cpus}")
        self.simulation = simulation
        self.ray_tmpdir: Path | None = None
        self._own_ray_tmpdir = False
        self.client_cpus = client_cpus
        self.ray_cpus = ray_cpus
        self.num_nodes = num_nodes
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="losskit-flower-")
        self.workdir = Path(workdir if workdir is not None else self._tmp.name)
        self.tls = tls
        self.node_configs = list(node_configs or [{}] * num_nodes)
        if len(self.node_configs) != num_nodes:
            raise ValueError(f"node_configs: expected {num_nodes} entries, got {len(self.node_configs)}")
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.port = 0
        self.certs: dict[str, Path] = {}

    # -- environment
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"FLWR_HOME": str(self.workdir / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
                    "PYTHONUNBUFFERED": "1",
                    # Flower's programs start each other by name: this interpreter's first
                    "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])})
        if self.simulation:
            env.update({"RAY_TMPDIR": str(self.ray_tmpdir or self.workdir / "ray"), "RAY_USAGE_STATS_ENABLED": "0"})
        return env

    def _write_flower_config(self) -> None:
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        sec = f'root-certificates = "{self.certs["ca"]}"' if self.tls else "insecure = true"
        (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                          f'address = "{HOST}:{self.port}"\n{sec}\n')

    def _spawn(self, what: str, argv: list[str]) -> subprocess.Popen:
        log = self.workdir / f"{what}.log"
        fh = open(log, "wb")
        try:
            p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                 cwd=self.workdir, start_new_session=True)
        finally:
            fh.close()
        self.procs.append((what, p, log))
        return p

    # -- lifecycle
    def start(self) -> "Loopback":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certs = make_self_signed_certificates(self.workdir / "certs")
        self.port = free_port()
        self._write_flower_config()
        sec = (["--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"]),
                "--ssl-ca-certfile", str(self.certs["ca"])] if self.tls else ["--insecure"])
        if self.simulation:
            if not simulation_available():
                raise ImportError("Flower's simulation engine needs Ray: pip install 'losskit[simulation]' "
                                  f"(no 'ray' or no 'flwr-simulation' for {sys.executable})", name="ray")
            ray_dir = self.workdir.resolve() / "ray"
            if len(os.fsencode(ray_dir)) + RAY_SOCKET_SUFFIX > 107:  # AF_UNIX path limit
                ray_dir = Path(tempfile.mkdtemp(prefix="losskit-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
                self._own_ray_tmpdir = True
            ray_dir.mkdir(parents=True, exist_ok=True)
            self.ray_tmpdir = ray_dir
        try:
            link = self._spawn("superlink", [_program("flower-superlink"), *sec, "--host", HOST, "--port",
                                             str(self.port), "--disable-runtime-dependency-installation",
                                             *(["--simulation"] if self.simulation else [])])
            deadline = time.monotonic() + self.start_timeout
            _wait_port(self.port, deadline, link, "the SuperLink", self.procs[-1][2])
            if self.simulation:
                return self
            node_sec = ["--root-certificates", str(self.certs["ca"])] if self.tls else ["--insecure"]
            for i, extra in enumerate(self.node_configs):
                node_port = free_port()
                cfg = {"partition-id": i, "num-partitions": self.num_nodes, **extra}
                p = self._spawn(f"supernode-{i}", [_program("flower-supernode"), *node_sec, "--superlink",
                                                   f"{HOST}:{self.port}", "--host", HOST, "--port", str(node_port),
                                                   "--node-config", format_run_config(cfg)])
                _wait_port(node_port, deadline, p, f"SuperNode {i}", self.procs[-1][2])
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self, app: str | os.PathLike, run_config: Mapping[str, Any] | None = None) -> subprocess.Popen:
        """Start ``flwr run APP loopback --stream`` and return at once (its output goes to
        ``workdir/flwr-run.log``; :meth:`stop` ends it with the rest)."""
        argv = [_program("flwr"), "run", str(Path(app).resolve()), "loopback", "--stream"]
        if self.simulation:
            fed = {"num-supernodes": self.num_nodes, "client-resources-num-cpus": self.client_cpus}
            if self.ray_cpus is not None:
                fed["init-args-num-cpus"] = self.ray_cpus
            argv += ["--federation-config", format_run_config(fed)]
        if run_config:
            argv += ["--run-config", format_run_config(run_config)]
        log = self.workdir / "flwr-run.log"
        with open(log, "wb") as fh:
            p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                 cwd=self.workdir, start_new_session=True)
        self.procs.append(("flwr-run", p, log))
        return p

    def run(self, app: str | os.PathLike, run_config: Mapping[str, Any] | None = None, *,
            timeout: float = 300.0) -> subprocess.CompletedProcess:
        """``flwr run APP loopback --stream``: wait for the run to finish (or raise after ``timeout``)."""
        p = self.launch(app, run_config)
        log = self.procs[-1][2]
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(p, 5.0)
            raise TimeoutError(f"flwr run did not finish in {timeout:.0f} s; log {log}:\n{_tail(log)}") from None
        self.procs = [t for t in self.procs if t[1] is not p]
        return subprocess.CompletedProcess(p.args, rc, log.read_text(errors="replace"), "")

    def process_tree(self) -> dict[int, str]:
        """``{pid: start time}`` of every live process started here and of their descendants
        (Linux ``/proc``; empty elsewhere).  The start time tells a pid reused later apart."""
        return _descendants([p.pid for _, p, _ in self.procs])

    def stop(self) -> None:
        tree = self.process_tree()
        for _, p, _ in reversed(self.procs):
            _kill_group(p, self.stop_grace)
        self.procs.clear()
        _kill_pids(tree, self.stop_grace)
        if self._own_ray_tmpdir and self.ray_tmpdir is not None:
            shutil.rmtree(self.ray_tmpdir, ignore_errors=True)
            self._own_ray_tmpdir = False

    def alive(self) -> list[str]:
        return [w for w, p, _ in self.procs if p.poll() is None]

    def logs(self) -> str:
        return "\n".join(f"--- {w} ({log})\n{_tail(log)}" for w, _, log in self.procs)

    def __enter__(self) -> "Loopback":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def _proc_table() -> dict[int, tuple[int, str]]:
    """``{pid: (ppid, start time)}`` of the live (non-zombie) processes, from ``/proc``; ``{}`` without it."""
    proc = Path("/proc")
    out: dict[int, tuple[int, str]] = {}
    if not proc.is_dir():
        return out
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] in ("Z", "X"):
            continue
        out[int(d.name)] = (int(fields[1]), fields[19])
    return out


def _descendants(roots: Sequence[int]) -> dict[int, str]:
    """``{pid: start time}`` of ``roots`` (those alive) and all their live descendants."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, str] = {}
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out[pid] = table[pid][1]
        todo.extend(children.get(pid, []))
    return out


def live_pids(tree: Mapping[int, str]) -> list[int]:
    """The pids of ``tree`` (from :meth:`Loopback.process_tree`) still alive and not zombies
    (a pid whose start time changed is another process)."""
    table = _proc_table()
    return sorted(pid for pid, start in tree.items() if pid in table and table[pid][1] == start)


def _kill_pids(tree: Mapping[int, str], grace: float) -> None:
    """SIGTERM the processes of ``tree`` still alive, SIGKILL those left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = live_pids(tree)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while live_pids(tree) and time.monotonic() < deadline:
            time.sleep(0.1)


def _kill_group(p: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group of ``p``, SIGKILL it after ``grace`` seconds, reap ``p``."""
    try:
        pgid = os.getpgid(p.pid)
    except ProcessLookupError:
        pgid = None
    # SIGTERM first, then SIGKILL for the group's other members (ServerApp, SuperExec, ClientApp) too
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if pgid is not None:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m losskit.integrations.flower.loopback",
                                 description="Run a Flower app through one SuperLink and N SuperNodes on 127.0.0.1.")
    ap.add_argument("--app", default="examples/flower-app", help="the Flower app folder (default: %(default)s)")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--tls", action="store_true", help="self-signed TLS instead of --insecure")
    ap.add_argument("--simulation", action="store_true",
                    help="Flower's simulation engine (Ray) with --nodes virtual SuperNodes instead of SuperNode "
                         "processes; needs losskit[simulation]")
    ap.add_argument("--client-cpus", type=int, default=1, help="--simulation: Ray CPUs per ClientApp")
    ap.add_argument("--run-config", default="", help='e.g. "algorithm=\'fedld\' num-server-rounds=2"')
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--workdir", default=None, help="keep logs and results here (default: a temporary folder)")
    a = ap.parse_args(argv)
    with Loopback(a.nodes, workdir=a.workdir, tls=a.tls, simulation=a.simulation,
                  client_cpus=a.client_cpus) as fed:
        out = fed.workdir / "out"
        cfg = dict(_parse_pairs(a.run_config))
        cfg.setdefault("out-dir", str(out))
        t0 = time.perf_counter()
        res = fed.run(a.app, cfg, timeout=a.timeout)
        took = time.perf_counter() - t0
        result = out / "result.json"
        print(res.stdout[-4000:])
        if result.exists():
            print(result.read_text())
        kind = "virtual SuperNodes (simulation engine)" if a.simulation else "SuperNodes"
        print(f"flwr run exit code {res.returncode}; {took:.1f} s; {a.nodes} {kind}; "
              f"{'TLS' if a.tls else 'insecure'}")
        return 0 if res.returncode == 0 and result.exists() else 1


def _parse_pairs(s: str):
    import shlex

    for tok in shlex.split(s):
        k, _, v = tok.partition("=")
        try:
            import tomllib

            yield k, tomllib.loads(f"x = {v}")["x"]
        except Exception:
            yield k, v


if __name__ == "__main__":
    sys.exit(main())
