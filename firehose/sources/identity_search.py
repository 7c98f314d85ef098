"""Finding files again by identity (device, inode) in the directories they were last seen in:
the file source's search for a rotated file renamed out of its ``paths`` while no descriptor
followed it (see ``firehose.sources.file``)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Protocol

# Directory entries a scan examines looking for rotated files that went missing: a pass over a
# larger directory spans several scans, so a huge /var/log never stalls discovery.
SEARCH_ENTRIES_PER_SCAN = 4096

Ident = tuple[int, int]  # (device, inode)


class _Entries(Protocol):
    """An open directory listing (what ``os.scandir`` returns)."""

    def __next__(self) -> os.DirEntry[str]: ...

    def close(self) -> None: ...


@dataclass
class _Directory:
    wanted: set[Ident]  # files looked for here
    due: set[Ident] = field(default_factory=set)  # wanted when the current pass began: gone if it ends without them
    entries: _Entries | None = None  # the current pass


@dataclass
class SearchStep:
    """What one ``IdentitySearch.step`` learnt."""

    found: list[tuple[Ident, str]] = field(default_factory=list)  # (identity, the name it has now)
    gone: list[tuple[Ident, str]] = field(default_factory=list)  # (identity, "not_found" | "directory_gone")
    failed: list[tuple[str, OSError]] = field(default_factory=list)  # directories that could not be listed
    examined: int = 0  # directory entries looked at


class IdentitySearch:
    """Looks for files by (device, inode) in the directories they were last seen in, as a rotated
    file renamed out of ``paths`` is found again.

    Bounded: ``step`` examines at most ``budget`` directory entries (one ``lstat`` each), so a pass
    over a large directory spans several steps; one listing is open per directory searched, and
    memory is one small record per file looked for. A file is ``gone`` once a whole pass that began
    after it was wanted did not find it. Not thread-safe: one caller at a time.
    """

    def __init__(self, budget: int = SEARCH_ENTRIES_PER_SCAN) -> None:
        self.budget = budget
        self._dirs: dict[str, _Directory] = {}
        self._where: dict[Ident, str] = {}

    def __contains__(self, ident: object) -> bool:
        return ident in self._where

    def __len__(self) -> int:
        return len(self._where)

    def want(self, directory: str, ident: Ident) -> None:
        """Look for the file ``ident`` in ``directory``."""
        self.drop(ident)
        self._where[ident] = directory
        self._dirs.setdefault(directory, _Directory(set())).wanted.add(ident)

    def drop(self, ident: Ident) -> None:
        """Stop looking for ``ident`` (found, or back where it was)."""
        directory = self._where.pop(ident, None)
        if directory is None:
            return
        d = self._dirs[directory]
        d.wanted.discard(ident)
        d.due.discard(ident)
        if not d.wanted:
            self._end_pass(d)
            del self._dirs[directory]

    def step(self) -> SearchStep:
        """Examine up to ``budget`` entries, continuing each directory's pass where it stopped."""
        out = SearchStep()
        for directory in list(self._dirs):
            if out.examined >= self.budget:
                break
            d = self._dirs[directory]
            if d.entries is None:
                try:
                    d.entries = os.scandir(directory)
                except (FileNotFoundError, NotADirectoryError):
                    for ident in list(d.wanted):
                        out.gone.append((ident, "directory_gone"))
                        self.drop(ident)
                    continue
                except OSError as exc:  # unreadable now: tried again next step, nothing given up
                    out.failed.append((directory, exc))
                    continue
                d.due = set(d.wanted)
            self._walk(directory, d, out)
        return out

    def _walk(self, directory: str, d: _Directory, out: SearchStep) -> None:
        assert d.entries is not None
        while out.examined < self.budget:
            try:
                entry = next(d.entries, None)
            except OSError as exc:
                self._end_pass(d)
                out.failed.append((directory, exc))
                return
            if entry is None:  # a whole pass: what it was due to find is not in the directory
                due = d.due
                self._end_pass(d)
                for ident in due:
                    out.gone.append((ident, "not_found"))
                    self.drop(ident)
                if directory in self._dirs:  # wanted since the pass began: another pass, after the others
                    self._dirs[directory] = self._dirs.pop(directory)
                return
            out.examined += 1
            try:
                st = entry.stat(follow_symlinks=False)  # not d_ino: it can differ from st_ino (overlayfs)
            except OSError:
                continue  # gone since it was listed
            ident = (st.st_dev, st.st_ino)
            if ident in d.wanted and stat.S_ISREG(st.st_mode):
                out.found.append((ident, entry.path))
                self.drop(ident)
                if directory not in self._dirs:
                    return

    @staticmethod
    def _end_pass(d: _Directory) -> None:
        if d.entries is not None:
            d.entries.close()
            d.entries = None
        d.due = set()

    def close(self) -> None:
        for d in self._dirs.values():
            self._end_pass(d)
        self._dirs.clear()
        self._where.clear()
