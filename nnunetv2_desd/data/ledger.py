"""Per-case records that survive a kill: append-only JSON lines, one file per writing process, merged on reading.

A record is appended (and flushed) only after its case's work is complete, so a process killed at any moment
loses at most the line it was writing; a torn last line is skipped when read. Several processes (jobs, nodes)
write their own files, so no two ever write the same file.
"""
import json
import os
import socket
import zlib
from typing import Dict, Optional


class Ledger:
    def __init__(self, folder: str):
        self.folder = folder
        self._file = None

    def read(self) -> Dict[str, dict]:
        """The latest record of every key, over all writers' files (in modification order)."""
        records: Dict[str, dict] = {}
        if not os.path.isdir(self.folder):
            return records
        files = [os.path.join(self.folder, f) for f in os.listdir(self.folder) if f.endswith('.jsonl')]
        for file in sorted(files, key=os.path.getmtime):
            with open(file) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        records[entry['key']] = entry['record']
                    except (ValueError, KeyError, TypeError):
                        continue  # a line torn by a kill
        return records

    def append(self, key: str, record: dict) -> None:
        if self._file is None:
            os.makedirs(self.folder, exist_ok=True)
            name = f'{socket.gethostname()}-{os.getpid()}.jsonl'
            self._file = open(os.path.join(self.folder, name), 'a')
        self._file.write(json.dumps({'key': key, 'record': record}) + '\n')
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def file_signature(files) -> list:
    """(size, mtime in ns) of each file: a changed file gets a new signature."""
    signature = []
    for file in files:
        st = os.stat(file)
        signature.append([st.st_size, st.st_mtime_ns])
    return signature


def current(record: Optional[dict], files) -> bool:
    """Whether ``record`` was made from these files as they are now."""
    try:
        return record is not None and record.get('files') == file_signature(files)
    except OSError:
        return False


def in_share(key: str, part: int, parts: int) -> bool:
    """Whether ``key`` belongs to share ``part`` of ``parts`` (by a stable hash, so adding cases moves none)."""
    return parts <= 1 or zlib.crc32(key.encode()) % parts == part
