"""A job's checkpoints as the API serves them: listed, described, resolved to a location,
streamed as a tar.gz, purged.

Ray Train writes them to ``{storage}/{job_id}/checkpoint_*/`` (state.pt beside meta.json); the
storage is a local directory or a pyarrow filesystem URI (``s3://bucket/prefix?endpoint_override=...``),
and both are read through one code path, a pyarrow FileSystem. Only meta.json is read here, so
this module imports neither torch nor Ray (resolving "latest" imports Ray's run registry, when asked).

A location this module hands out keeps the storage URI's query (an endpoint override is needed to
reach the files again); :func:`display_location` strips it, with any credentials, for showing.
"""

from __future__ import annotations

import logging
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.errors import Conflict, InvalidRequest, NotFound, ServiceError
from service.jobs.schemas import CheckpointDetail, CheckpointRef
from workers.storage import redact_uri
from workers.train.checkpoint_meta import META_FILE, CheckpointMeta

log = logging.getLogger(__name__)

LATEST = "latest"
CHECKPOINT_PREFIX = "checkpoint_"
# A plain directory name as Ray Train makes them (checkpoint_2026-12-03_16-20-01.123456): no
# separator, no "..", so an id can never name anything outside its job's folder.
_CHECKPOINT_ID = re.compile(r"^checkpoint_[A-Za-z0-9_.-]{1,200}$")
# The JobSpec's job_id pattern: checked again here because purge deletes {storage}/{job_id}.
_JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# gzip level 6, zlib's default: state.pt is mostly float32 weights that barely compress, so a
# higher level costs CPU for nothing.
_GZIP_LEVEL = 6


class InvalidCheckpointId(InvalidRequest):
    """The checkpoint id is not a checkpoint directory's name (nor ``latest``)."""

    def __init__(self, checkpoint_id: str) -> None:
        super().__init__(f"checkpoint id {checkpoint_id[:100]!r} is not 'latest' nor a checkpoint name "
                         f"(checkpoint_<timestamp>, without '/' or '..')", field="checkpoint_id")


class CheckpointNotFound(NotFound):
    """The job has no such checkpoint (or none at all, for ``latest``)."""

    code = "checkpoint_not_found"


class CheckpointStorageUnavailable(ServiceError):
    """The checkpoint storage cannot be read (an object store down, a permission refused): 503,
    since the same request may work once the storage is back."""

    status_code = 503
    code = "checkpoint_storage_unavailable"


class PurgeRefused(Conflict):
    """The folder a purge would delete holds more than a job's checkpoints."""

    code = "purge_refused"


@dataclass(frozen=True)
class _Place:
    """A folder as pyarrow reaches it (``fs``, ``path``) and as a location names it: ``uri`` (a
    local path, or the URI with its scheme and any credentials, without the query) and the
    storage URI's ``query``, which every location under it keeps."""

    fs: Any  # pyarrow.fs.FileSystem
    path: str
    uri: str
    query: str = ""

    @property
    def location(self) -> str:
        """This folder as a location :func:`_open` reopens."""
        return self.uri + (f"?{self.query}" if self.query else "")

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    def child(self, relative: str) -> _Place:
        """The folder or file at ``relative`` (a '/'-separated path) under this one."""
        relative = relative.strip("/")
        return _Place(self.fs, f"{self.path}/{relative}", f"{self.uri}/{relative}", self.query)


def _open(location: str) -> _Place:
    """The filesystem and path of a local path or a pyarrow URI; CheckpointStorageUnavailable
    naming the location when pyarrow cannot make one of it."""
    from pyarrow.fs import FileSystem, LocalFileSystem

    if "://" not in location:
        path = str(Path(location).absolute())
        return _Place(LocalFileSystem(), path, path)
    try:
        fs, path = FileSystem.from_uri(location)
    except (OSError, ValueError) as exc:  # pyarrow raises both (ArrowInvalid is a ValueError)
        raise CheckpointStorageUnavailable(f"checkpoint storage {display_location(location)} cannot be "
                                           f"opened: {exc}") from exc
    uri, _, query = location.partition("?")
    return _Place(fs, path.rstrip("/"), uri.rstrip("/"), query)


def display_location(location: str) -> str:
    """``location`` without its URI query and credentials: safe to show in API responses."""
    return redact_uri(location)


def _job_folder(storage: str, job_id: str) -> _Place:
    if not _JOB_ID.fullmatch(job_id):
        raise InvalidRequest(f"job id {job_id[:100]!r} is not a job id", field="job_id")
    return _open(storage).child(job_id)


def _check_id(checkpoint_id: str) -> None:
    if not _CHECKPOINT_ID.fullmatch(checkpoint_id) or ".." in checkpoint_id:
        raise InvalidCheckpointId(checkpoint_id)


def _unavailable(what: str, location: str, exc: BaseException) -> CheckpointStorageUnavailable:
    return CheckpointStorageUnavailable(f"cannot read {what} at {display_location(location)}: {exc}")


def _read_meta(place: _Place) -> CheckpointMeta:
    """meta.json of the checkpoint folder ``place``; FileNotFoundError or ValidationError (a
    ValueError) when it is missing or not valid, OSError when the storage fails."""
    with place.fs.open_input_stream(f"{place.path}/{META_FILE}") as f:
        raw = f.read()
    return CheckpointMeta.model_validate_json(raw)


def _ref(checkpoint_id: str, meta: CheckpointMeta) -> CheckpointRef:
    return CheckpointRef(id=checkpoint_id, step=meta.step, examples=meta.examples, written_at=meta.written_at)


def list_checkpoints(storage: str, job_id: str) -> list[CheckpointRef]:
    """The checkpoints in ``{storage}/{job_id}``, newest first (by step, then written_at); [] when
    there are none. A folder without a readable meta.json (one being uploaded, or broken) is
    skipped with a warning. Raises CheckpointStorageUnavailable when the storage cannot be read."""
    from pyarrow.fs import FileSelector, FileType

    job = _job_folder(storage, job_id)
    try:
        infos = job.fs.get_file_info(FileSelector(job.path, allow_not_found=True))
    except OSError as exc:
        raise _unavailable(f"the checkpoints of job {job_id}", job.location, exc) from exc
    refs = []
    for info in infos:
        if info.type != FileType.Directory or not _CHECKPOINT_ID.fullmatch(info.base_name):
            continue
        try:
            refs.append(_ref(info.base_name, _read_meta(job.child(info.base_name))))
        except (OSError, ValueError) as exc:  # missing (FileNotFoundError), unreadable, or invalid
            log.warning("skipping checkpoint %s of job %s: no readable %s (%s)", info.base_name, job_id,
                        META_FILE, exc)
    return sorted(refs, key=lambda r: (r.step, r.written_at), reverse=True)


def resolve_checkpoint(storage: str, job_id: str, checkpoint_id: str) -> str:
    """The location (local path, or URI with the storage's query) of the checkpoint
    ``checkpoint_id`` of job ``job_id``; ``latest`` is the one Ray Train registered last, the
    one a resume starts from. Raises InvalidCheckpointId, CheckpointNotFound, or
    CheckpointStorageUnavailable."""
    place = _resolve(storage, job_id, checkpoint_id)
    return place.location


def _resolve(storage: str, job_id: str, checkpoint_id: str) -> _Place:
    from pyarrow.fs import FileType

    job = _job_folder(storage, job_id)
    if checkpoint_id == LATEST:
        checkpoint_id = _latest_id(storage, job_id)
    _check_id(checkpoint_id)
    place = job.child(checkpoint_id)
    try:
        kind = place.fs.get_file_info(place.path).type
    except OSError as exc:
        raise _unavailable(f"checkpoint {checkpoint_id}", place.location, exc) from exc
    if kind != FileType.Directory:
        raise CheckpointNotFound(f"job {job_id} has no checkpoint {checkpoint_id}", field="checkpoint_id")
    return place


def _latest_id(storage: str, job_id: str) -> str:
    """The name of the checkpoint Ray Train registered last for the job."""
    from workers.runner import latest_checkpoint  # imports Ray and torch: only when asked for

    durable = latest_checkpoint(storage, job_id)
    if durable is None:
        raise CheckpointNotFound(f"job {job_id} has no checkpoint yet", field="checkpoint_id")
    return durable.location.partition("?")[0].rstrip("/").rpartition("/")[2]


def checkpoint_detail(storage: str, job_id: str, checkpoint_id: str) -> CheckpointDetail:
    """One checkpoint (``latest``: the one a resume starts from): its counters, offsets and size
    in bytes (all its files). ``metrics`` is None: the service fills it from its store. Raises
    InvalidCheckpointId, CheckpointNotFound (also for a folder without a readable meta.json), or
    CheckpointStorageUnavailable."""
    place = _resolve(storage, job_id, checkpoint_id)
    name = place.name
    try:
        meta = _read_meta(place)
    except FileNotFoundError as exc:
        raise CheckpointNotFound(f"checkpoint {name} of job {job_id} is incomplete (no {META_FILE})",
                                 field="checkpoint_id") from exc
    except ValueError as exc:
        raise CheckpointNotFound(f"checkpoint {name} of job {job_id} has an invalid {META_FILE}: {exc}",
                                 field="checkpoint_id") from exc
    except OSError as exc:
        raise _unavailable(f"checkpoint {name}", place.location, exc) from exc
    size = sum(info.size or 0 for info in _files(place))
    return CheckpointDetail(**_ref(name, meta).model_dump(), offsets=meta.offsets, size_bytes=size)


def _files(place: _Place) -> list[Any]:
    """The files (pyarrow FileInfo) under ``place``, recursively, sorted by path."""
    from pyarrow.fs import FileSelector, FileType

    try:
        infos = place.fs.get_file_info(FileSelector(place.path, allow_not_found=True, recursive=True))
    except OSError as exc:
        raise _unavailable("a checkpoint", place.location, exc) from exc
    return sorted((i for i in infos if i.type == FileType.File), key=lambda i: i.path)


def purge_checkpoints(storage: str, job_id: str) -> None:
    """Delete ``{storage}/{job_id}``: every checkpoint of the job and Ray Train's run registry
    (a later job with this id starts afresh). Nothing to delete is fine."""
    from pyarrow.fs import FileSelector, FileType

    job = _job_folder(storage, job_id)
    try:
        if job.fs.get_file_info(job.path).type == FileType.NotFound:
            return
        # The storage path comes from a request: delete only what Ray Train and the workers write
        # there (checkpoint_* folders, Ray's dot-files and its run registry), never a folder that
        # happens to be at {storage}/{job_id} (e.g. storage "/" and job "etc").
        entries = job.fs.get_file_info(FileSelector(job.path))
        foreign = sorted(e.base_name for e in entries if not e.base_name.startswith(("checkpoint_", ".")))
        if foreign:
            raise PurgeRefused(f"{display_location(job.location)} is not only the checkpoints of job {job_id} "
                               f"(it also holds {', '.join(foreign[:5])}); nothing was deleted")
        job.fs.delete_dir(job.path)
    except OSError as exc:
        raise _unavailable(f"the checkpoints of job {job_id}", job.location, exc) from exc
    log.info("purged the checkpoints of job %s in %s", job_id, display_location(storage))


def archive_stream(location: str, *, chunk_size: int = 1 << 16) -> Iterator[bytes]:
    """The checkpoint folder at ``location`` as a tar.gz, in pieces of about ``chunk_size``
    bytes, made as they are asked for: at most one piece of a file and of the compressed output
    is in memory at a time, however large the checkpoint. Members are named
    ``<checkpoint_id>/<path inside it>``.

    The tar is written here (headers by ``tarfile.TarInfo``, data, padding, end blocks) rather
    than by ``tarfile.open(mode="w|gz")``, which copies each member whole in one call and so
    cannot hand out pieces in between without a thread. A file that shrinks or vanishes while it
    is read (Ray Train deleting an old checkpoint under ``keep``) raises
    CheckpointStorageUnavailable: the archive is cut short, never silently corrupt.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    place = _open(location)
    files = _files(place)  # listed before the first byte goes out, so a missing folder raises at once
    if not files:
        raise CheckpointNotFound(f"no checkpoint at {display_location(location)}")
    return _tar_gz(place, files, chunk_size)


def _tar_gz(place: _Place, files: list[Any], chunk_size: int) -> Iterator[bytes]:
    gzip = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 16+15: a gzip header and trailer
    out = bytearray()
    written = 0  # bytes of tar so far, before compression

    def tar(data: bytes) -> None:
        nonlocal written
        written += len(data)
        out.extend(gzip.compress(data))

    for info in files:
        member = tarfile.TarInfo(f"{place.name}/{_relative(place, info)}")
        member.size = info.size or 0
        member.mtime = int(info.mtime.timestamp()) if info.mtime is not None else 0
        member.mode = 0o644
        tar(member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        for data in _read(place, info, chunk_size):
            tar(data)
            if len(out) >= chunk_size:
                yield bytes(out)
                out.clear()
        tar(tarfile.NUL * (-member.size % tarfile.BLOCKSIZE))
    # Two zero blocks end the archive; like tarfile, pad it to whole records (10 KiB).
    end = 2 * tarfile.BLOCKSIZE
    tar(tarfile.NUL * (end + -(written + end) % tarfile.RECORDSIZE))
    out.extend(gzip.flush())
    while out:
        yield bytes(out[:chunk_size])
        del out[:chunk_size]


def _relative(place: _Place, info: Any) -> str:
    """The path of the file ``info`` inside the folder ``place``."""
    return str(info.path)[len(place.path):].lstrip("/")


def _read(place: _Place, info: Any, chunk_size: int) -> Iterator[bytes]:
    """The bytes of one file in pieces, exactly ``info.size`` of them."""
    left = info.size or 0
    try:
        with place.fs.open_input_stream(info.path) as f:
            while left > 0:
                data = f.read(min(chunk_size, left))
                if not data:
                    break
                left -= len(data)
                yield bytes(data)
    except OSError as exc:
        raise _unavailable("a checkpoint file", place.child(_relative(place, info)).location, exc) from exc
    if left:
        shown = display_location(place.child(_relative(place, info)).location)
        raise CheckpointStorageUnavailable(f"{shown} shrank while it was "
                                           f"archived ({left} bytes short): the checkpoint was deleted or rewritten")
