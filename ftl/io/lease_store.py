"""Conditional writes of one small object: create-if-absent and compare-and-swap, per store.

S3 does both itself (`If-None-Match: *` and `If-Match: <ETag>` on PutObject). A local disk has
`O_EXCL` for the create; the swap runs under an flock'ed mutex beside the file, so a read, a
comparison and a write are one step for every process on the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ftl.errors import chain


def store_for(fs: fsspec.AbstractFileSystem):
    if isinstance(fs, LocalFileSystem):
        return LocalStore()
    if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return S3Store(fs)
    return BestEffortStore(fs)


def precondition_failed(e: OSError) -> bool:
    """Only a failed condition: s3fs raises FileExistsError for If-None-Match, and for If-Match an
    OSError(EINVAL) raised from botocore's ClientError with HTTP 412 (EINVAL alone means many things)."""
    if isinstance(e, FileExistsError):
        return True
    for cause in chain(e):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in ("PreconditionFailed", "412") or status == 412
    return False


class S3Store:
    def __init__(self, fs):
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, str] | None:
        """The object and the ETag of exactly those bytes (re-read if it changed in between)."""
        for _ in range(5):
            try:
                before = self.fs.info(path)["ETag"]
                data = self.fs.cat_file(path)
                if self.fs.info(path)["ETag"] == before:
                    return data, before
            except FileNotFoundError:
                return None
        raise OSError(f"{path} keeps changing while it is read")

    def create(self, path: str, data: bytes) -> str | None:
        try:
            return self.fs.pipe_file(path, data, mode="create")["ETag"]
        except OSError as e:
            if precondition_failed(e):
                return None
            raise

    def replace(self, path: str, data: bytes, *, expected: str) -> str | None:
        try:
            return self.fs.pipe_file(path, data, IfMatch=expected)["ETag"]
        except FileNotFoundError:
            return None
        except OSError as e:
            if precondition_failed(e):
                return None
            raise

    def delete(self, path: str, *, expected: str) -> None:
        found = self.read(path)
        if found is not None and found[1] == expected:
            self.fs.rm_file(path)


class HashedStore:
    """Stores without ETags: the ETag is the content's hash, and every change happens under `mutex`."""

    def mutex(self, path: str):
        raise NotImplementedError

    def load(self, path: str) -> bytes:  # FileNotFoundError when absent
        raise NotImplementedError

    def create_new(self, path: str, data: bytes) -> None:  # FileExistsError when present
        raise NotImplementedError

    def overwrite(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    def remove(self, path: str) -> None:
        raise NotImplementedError

    def read(self, path: str) -> tuple[bytes, str] | None:
        try:
            data = self.load(path)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def create(self, path: str, data: bytes) -> str | None:
        with self.mutex(path):
            try:
                self.create_new(path, data)
            except FileExistsError:
                return None
        return hashlib.sha256(data).hexdigest()

    def replace(self, path: str, data: bytes, *, expected: str) -> str | None:
        with self.mutex(path):
            found = self.read(path)
            if found is None or found[1] != expected:
                return None
            self.overwrite(path, data)
        return hashlib.sha256(data).hexdigest()

    def delete(self, path: str, *, expected: str) -> None:
        with self.mutex(path):
            found = self.read(path)
            if found is not None and found[1] == expected:
                self.remove(path)


class LocalStore(HashedStore):
    """O_EXCL creates; an flock'ed file beside the lease makes read-compare-write one step."""

    @contextlib.contextmanager
    def mutex(self, path: str):
        import fcntl

        fd = os.open(path + ".mutex", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock; a dead process's lock goes with it

    def load(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def create_new(self, path: str, data: bytes) -> None:
        # Written aside, then hard-linked in: the link fails if the name exists (as O_EXCL does), and
        # a reader that takes no mutex sees the whole file or none.
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        finally:
            os.remove(tmp)

    def overwrite(self, path: str, data: bytes) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers see the old record or the new one, never half of one

    def remove(self, path: str) -> None:
        os.remove(path)


class BestEffortStore(HashedStore):
    """Other fsspec stores: create-if-absent where the store offers it; no cross-process mutex, so a
    takeover race between two runs is possible there, if unlikely (README says which stores are exact)."""

    def __init__(self, fs):
        self.fs = fs

    @contextlib.contextmanager
    def mutex(self, path: str):
        yield

    def load(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def create_new(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data, mode="create")

    def overwrite(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)

    def remove(self, path: str) -> None:
        self.fs.rm_file(path)
