"""Remote storage of a run: `train.storage_path` (s3://bucket/prefix, gs://..., or a shared folder).

Ray Train writes the checkpoints there itself (its `storage_path`) and hands them back on resume,
from any machine; this module checks the location before a run starts and copies the exported final
model there. pyarrow's filesystems do the I/O. S3 takes its credentials and endpoint from the usual
AWS variables (`AWS_ENDPOINT_URL` for an S3-compatible server such as MinIO), on every node.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow
import pyarrow.fs as pafs

from raydpo.errors import UserError


def is_uri(path: str | Path | None) -> bool:
    return path is not None and "://" in str(path)


def _fs(uri: str, field: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, ValueError, OSError) as e:
        raise UserError(f"{field}={uri}: not a storage location pyarrow can open ({_line(e)})") from None


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def check_storage(uri: str, field: str = "train.storage_path") -> None:
    """Fail before Ray starts, with one line, when `uri` cannot be written (no such bucket, no
    credentials, an endpoint that does not answer): a small file is written there and removed."""
    fs, path = _fs(uri, field)
    probe = f"{path.rstrip('/')}/.raydpo-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(path.rstrip("/"), recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except (OSError, pyarrow.ArrowException) as e:
        raise UserError(f"{field}={uri}: cannot write there ({_line(e)})") from None


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def upload_dir(local: Path, uri: str) -> str:
    """Copy the folder `local` to `uri` (replacing what was there); returns `uri`. Not atomic on object
    stores: the run's record (finished.json, the MLflow tag) is written after it."""
    fs, path = _fs(uri, "storage")
    fs.delete_dir_contents(path, missing_dir_ok=True)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri
