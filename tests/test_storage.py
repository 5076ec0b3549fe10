"""storage: files follow the umask; S3 reads and writes survive 503s and bodies cut mid-stream (a fault proxy)."""

from __future__ import annotations

import os
import stat

import pytest

from mm1data import storage
from mm1data.shards import TarShardWriter


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, mode):
    """As other tools: 0666 & ~umask, not mkstemp's 0600 (a shared output folder was unreadable by the group)."""
    umask(mask)

    def mode_of(p) -> int:
        return stat.S_IMODE(os.stat(p).st_mode)

    storage.write_bytes(str(tmp_path / "a" / "index.json"), b"{}")
    assert mode_of(tmp_path / "a" / "index.json") == mode
    fd, tmp = storage.create_temp(str(tmp_path))
    os.write(fd, b"x")
    os.close(fd)
    storage.put_file(tmp, str(tmp_path / "b" / "moved.bin"))
    assert mode_of(tmp_path / "b" / "moved.bin") == mode
    w = TarShardWriter(str(tmp_path / "c" / "c-000000.tar"))
    w.write({"0123456789abcdef.txt": b"hi"})
    w.close()
    assert mode_of(tmp_path / "c" / "c-000000.tar") == mode and mode_of(tmp_path / "c" / "c-000000.idx") == mode
    assert sorted(os.listdir(tmp_path / "c")) == ["c-000000.idx", "c-000000.tar"]  # no temp file left
