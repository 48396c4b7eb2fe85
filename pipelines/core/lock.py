"""One run per OUTPUT: a lease, taken before the run writes anything and renewed while it lives.

``OUTPUT/_lease.json`` names the run that holds OUTPUT (tool, host, pid, start time) and when its
lease expires. ``run_job`` takes it first thing (``Lease.acquire``): a second run into the same
OUTPUT is refused with one line naming the holder, before it writes anything. The holder renews it
every ``ttl / 3`` seconds from a thread; a run killed without a chance to release it leaves a lease
that expires ``ttl`` seconds after its last renewal, and the next run takes it over then -- at once
when the holder ran on the same host and its process is gone, or with ``--break-lock``, when the
user knows the holder is dead. A holder that cannot renew in time
(its lease was taken over, or the store kept failing) stops its run: it no longer owns OUTPUT.

How "take it if nobody holds it" is made atomic depends on where OUTPUT is:

- local filesystems (and NFS with working locks): the read-decide-write of the lease file happens
  under ``flock`` on it, so two runs on one machine (or NFS clients) cannot both win; the file is
  never removed (a released lease is an empty record), so the lock is always on the file in place;
- S3 (and S3-compatible stores that implement conditional writes): a new lease is created with
  ``If-None-Match: *``, renewed, taken over and released with ``If-Match`` on the ETag read, so of
  two runs only one write succeeds. A store that ignores these headers (older MinIO, Ceph) is
  detected at acquire time (a second ``If-None-Match`` write succeeds) and reported;
- other stores (gs://, az://, memory:// ...), and S3 stores that ignore conditions: best effort --
  read, write, read back. Two runs started within the same moment can both pass; the loser notices
  at its next renewal (the lease names the other run) and stops, at most ``ttl / 3`` seconds later.
  The run logs this once.

Clocks: expiry is the holder's wall-clock time; hosts sharing an OUTPUT need clocks that agree to
well within ``ttl`` (NTP does).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

from shardsmith.errors import RunError
from shardsmith.pipelines.core import fs as fsutil

LEASE_FILE = "_lease.json"
DEFAULT_TTL = 60.0  # seconds a lease lives without renewal


@dataclass
class Holder:
    run_id: str
    tool: str
    host: str
    pid: int
    started_at: float
    renewed_at: float
    expires_at: float
    ttl_s: float

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        """The holder a lease record names; None for a free lease (empty, ``{}``) or a record a
        killed writer left half-written (nobody can be renewing it)."""
        try:
            d = json.loads(data.decode("utf-8")) if data.strip() else {}
            return cls(**{k: d[k] for k in cls.__dataclass_fields__}) if d else None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def dead_here(self) -> bool:
        """The holder ran on this host and its process is gone: a killed run (SIGKILL, OOM, a
        crash) whose lease nobody renews; its rerun takes OUTPUT over at once instead of waiting
        for the expiry. (A pid reused by another process reads as alive: the lease then waits for
        its expiry, the safe way. Containers sharing an OUTPUT must not share a hostname.)"""
        return self.host == socket.gethostname() and not _pid_alive(self.pid)

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        alive = ""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            alive = ", a process no longer running on this host"
        return (f"{self.tool} on host {self.host}, pid {self.pid}{alive}, started {_utc(self.started_at)} "
                f"(lease renewed {max(0.0, now - self.renewed_at):.0f} s ago, "
                + (f"expires in {self.expires_at - now:.0f} s)" if self.expires_at > now else
                   f"expired {now - self.expires_at:.0f} s ago)"))


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return True


# ---------------------------------------------------------------------------------------------
# Stores: read, and the three conditional writes, each returning the new token or None on a lost race
# ---------------------------------------------------------------------------------------------

class LocalStore:
    """The lease file on a local filesystem; every operation under ``flock`` on the file, which is
    never removed or replaced (so every process locks the same inode). Token: the record's hash."""

    atomic = True
    how = "flock on the lease file"

    def __init__(self, path: str):
        self.path = path

    def _locked(self, fn):
        import fcntl

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    st = os.stat(self.path)
                except FileNotFoundError:
                    continue  # removed by hand while we waited: lock the new file
                fst = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
                    continue  # replaced by hand while we waited: lock the file now at the path
                return fn(fd)
            finally:
                os.close(fd)  # drops the flock

    @staticmethod
    def _read_fd(fd) -> bytes:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while True:
            b = os.read(fd, 65536)
            if not b:
                return b"".join(chunks)
            chunks.append(b)

    @staticmethod
    def _write_fd(fd, data: bytes) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)

    def read(self) -> tuple[bytes, str] | None:
        def op(fd):
            data = self._read_fd(fd)
            return (data, _digest(data)) if data.strip() else None
        return self._locked(op)

    def create(self, data: bytes) -> str | None:
        def op(fd):
            if Holder.parse(self._read_fd(fd)) is not None:
                return None
            self._write_fd(fd, data)
            return _digest(data)
        return self._locked(op)

    def replace(self, data: bytes, token: str) -> str | None:
        def op(fd):
            if _digest(self._read_fd(fd)) != token:
                return None
            self._write_fd(fd, data)
            return _digest(data)
        return self._locked(op)

    def release(self, token: str) -> bool:
        def op(fd):
            if _digest(self._read_fd(fd)) != token:
                return False
            self._write_fd(fd, b"")
            return True
        return self._locked(op)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class S3Store:
    """The lease object on S3 with conditional writes; token: the ETag."""

    atomic = True
    how = "S3 conditional writes (If-None-Match / If-Match)"

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, _, self.key = path.partition("/")

    def _call(self, method: str, **kw):
        """One S3 call, retried like every storage operation (``fs.with_retries``). A conditional
        write whose response was lost is retried and then refused (the first attempt applied it):
        ``Lease`` recognises its own record when it reads the lease back."""
        from fsspec.asyn import sync

        return fsutil.with_retries("the run's lease", f"s3://{self.bucket}/{self.key}",
                                   lambda: sync(self.fs.loop, self._acall, method, kw))

    async def _acall(self, method: str, kw: dict):
        resp = await self.fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kw)
        if method == "get_object":
            async with resp["Body"] as body:
                return await body.read(), resp["ETag"]
        return resp

    def read(self) -> tuple[bytes, str] | None:
        try:
            data, etag = self._call("get_object")
        except FileNotFoundError:
            return None
        return (data, etag) if data.strip() else None

    def _conditional(self, method: str, **kw):
        try:
            return self._call(method, **kw)
        except Exception as e:
            if _precondition_failed(e):
                return None
            raise

    def create(self, data: bytes) -> str | None:
        current = self.read()
        if current is not None:  # a released lease is deleted, but an empty record counts as free too
            return self.replace(data, current[1]) if Holder.parse(current[0]) is None else None
        resp = self._conditional("put_object", Body=data, IfNoneMatch="*")
        return resp["ETag"] if resp else None

    def replace(self, data: bytes, token: str) -> str | None:
        resp = self._conditional("put_object", Body=data, IfMatch=token)
        return resp["ETag"] if resp else None

    def release(self, token: str) -> bool:
        return self._conditional("delete_object", IfMatch=token) is not None

    def honours_conditions(self, data: bytes) -> bool:
        """After ``create``: a second create-if-absent of the same bytes must be refused. If the store
        accepts it (it ignores If-None-Match), the lease is only best effort there. The probe writes
        the same bytes again, so the ETag (and the lease) stays as it was."""
        return self._conditional("put_object", Body=data, IfNoneMatch="*") is None


def _precondition_failed(e: BaseException) -> bool:
    """412 Precondition Failed, or 409 ConditionalRequestConflict (a concurrent conditional write)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            err = resp.get("Error", {})
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if err.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        if isinstance(e, FileExistsError) or "pre-conditions you specified did not hold" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class BestEffortStore:
    """Any other fsspec store: plain read and write, no atomicity (see the module docstring)."""

    atomic = False

    def __init__(self, url: str, why: str):
        self.url = url
        self.how = f"best effort ({why})"

    def read(self) -> tuple[bytes, str] | None:
        try:
            data = fsutil.read_bytes(self.url)
        except FileNotFoundError:
            return None
        return (data, _digest(data)) if data.strip() else None

    def create(self, data: bytes) -> str | None:
        current = self.read()
        if current is not None and Holder.parse(current[0]) is not None:
            return None
        fsutil.write_bytes_atomic(self.url, data)
        back = self.read()
        return back[1] if back and back[0] == data else None

    def replace(self, data: bytes, token: str) -> str | None:
        current = self.read()
        if current is None or current[1] != token:
            return None
        fsutil.write_bytes_atomic(self.url, data)
        back = self.read()
        return back[1] if back and back[0] == data else None

    def release(self, token: str) -> bool:
        current = self.read()
        if current is None or current[1] != token:
            return False
        fsutil.remove(self.url)
        return True


def lease_store(output: str):
    url = fsutil.join(output, LEASE_FILE)
    fs, path = fsutil.get_fs(url)
    proto = fsutil.protocol_of_fs(fs)
    if proto in ("file", "local"):
        return LocalStore(path)
    if proto in ("s3", "s3a"):
        return S3Store(fs, path)
    return BestEffortStore(url, f"{proto}:// has no conditional writes here")


# ---------------------------------------------------------------------------------------------
# The lease
# ---------------------------------------------------------------------------------------------

class Lease:
    """``with Lease(output, tool, ttl, break_lock, log): ...`` -- acquire, renew, release."""

    def __init__(self, output: str, tool: str, ttl: float = DEFAULT_TTL, break_lock: bool = False, log=print,
                 on_lost: Callable[[], None] | None = None):
        if not ttl > 0:
            raise RunError(f"lock_ttl: must be > 0 seconds, got {ttl}")
        self.output, self.tool, self.ttl, self.break_lock, self.log = output, tool, float(ttl), break_lock, log
        self.store = lease_store(output)
        now = time.time()
        self.holder = Holder(uuid.uuid4().hex, tool, socket.gethostname(), os.getpid(), now, now, now + self.ttl,
                             self.ttl)
        self.token: str | None = None
        self.lost: str | None = None  # why this run no longer holds OUTPUT
        self.on_lost = on_lost or _interrupt_main
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        self.holder.renewed_at, self.holder.expires_at = now, now + self.ttl
        return self.holder.encode()

    def acquire(self) -> None:
        """Take the lease, or raise ``RunError`` naming the run that holds it."""
        try:
            self._acquire()
        except RunError:
            raise
        except Exception as e:
            raise RunError(f"{self.output}: output location is not writable (cannot take the run's lease "
                           f"{LEASE_FILE} there): {type(e).__name__}: {e}") from e

    def _acquire(self) -> None:
        for _ in range(5):
            current = self.store.read()
            if current is None:
                data = self._record()
                self.token = self.store.create(data)
                if self.token:
                    self._check_store(data)
                    return
                continue  # another run created it meanwhile: read who
            old = Holder.parse(current[0])
            now = time.time()
            if old is not None and old.run_id == self.holder.run_id:  # our own write, its answer lost
                self.token = current[1]
                self._check_store(current[0])
                return
            dead = old is not None and old.dead_here()
            if old is not None and old.expires_at > now and not self.break_lock and not dead:
                raise RunError(f"{self.output} is being written by another run: {old.describe(now)}; wait for it to "
                               "finish or use another OUTPUT; if that run is dead, rerun once its lease expires or "
                               "pass --break-lock")
            data = self._record()
            self.token = self.store.replace(data, current[1])
            if self.token:
                if old is not None:
                    why = ("its process is gone" if dead else "--break-lock" if old.expires_at > now
                           else "its lease expired")
                    self.log(f"taking over {self.output} from a run that no longer renews its lease ({why}): "
                             f"{old.describe(now)}")
                self._check_store(data)
                return
        raise RunError(f"{self.output}: could not take the run's lease (other runs are starting into it at the same "
                       "moment); rerun")

    def _check_store(self, data: bytes) -> None:
        if isinstance(self.store, S3Store) and not self.store.honours_conditions(data):
            self.store = BestEffortStore(f"s3://{self.store.bucket}/{self.store.key}",
                                         "this S3 endpoint ignores conditional writes")
            self.token = _digest(data)
        if not self.store.atomic:
            self.log(f"note: {self.output}: the one-run-per-output lease is {self.store.how}: two runs started at "
                     f"the same moment may both start; the later one stops within {self.ttl / 3:.0f} s")

    def renew_once(self) -> bool:
        """Renew; False (and ``lost`` set) when this run no longer holds the lease."""
        token = self.store.replace(self._record(), self.token)
        if token is None:
            current = self.store.read()
            other = Holder.parse(current[0]) if current else None
            if other is not None and other.run_id == self.holder.run_id:  # our renewal applied, its answer lost
                self.token = current[1]
                return True
            who = f"now held by {other.describe()}" if other and other.run_id != self.holder.run_id else "released"
            self.lost = f"{self.output}: this run lost its lease ({who}); it stopped so as not to write over another run"
            return False
        self.token = token
        return True

    def _renew_loop(self) -> None:
        interval = max(0.2, self.ttl / 3)
        last_ok = time.time()
        while not self._stop.wait(interval):
            try:
                if not self.renew_once():
                    break
                last_ok = time.time()
            except Exception as e:  # the store failed: keep trying while the lease is still ours
                if time.time() - last_ok >= self.ttl - interval / 2:
                    self.lost = (f"{self.output}: could not renew this run's lease for {time.time() - last_ok:.0f} s "
                                 f"({type(e).__name__}: {e}); stopped, since another run may now take over")
                    break
        if self.lost and not self._stop.is_set():
            self.on_lost()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="shardsmith-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.token and not self.lost:
            try:
                self.store.release(self.token)
            except Exception as e:  # the lease expires by itself
                self.log(f"warning: could not release the lease of {self.output} ({type(e).__name__}: {e}); it "
                         f"expires in {self.ttl:.0f} s")
        self.token = None

    def __enter__(self) -> "Lease":
        self.acquire()
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _interrupt_main() -> None:
    """Stop the run's main thread (as Ctrl-C would); ``run_job`` turns it into the lease error."""
    import _thread

    _thread.interrupt_main()
