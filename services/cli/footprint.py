"""The memory a set of processes holds: proportional set size (PSS) per process.

PSS (`Pss:` in /proc/PID/smaps_rollup) charges each resident page to the processes
that map it in equal parts: a library mapped by four services counts a quarter in
each, so the PSS of all of a stack's processes adds up to the memory the stack
holds, where RSS would count shared pages once per process. Linux only; a process
that is gone or unreadable counts 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessMemory:
    """One process: the stack's name for what it belongs to, its pid, command line, PSS."""

    owner: str
    pid: int
    command: str
    pss_bytes: int


def pss_bytes(pid: int) -> int:
    """The process's proportional set size in bytes (0 if it is gone or unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def command_of(pid: int) -> str:
    """The process's command line, arguments joined by spaces ('' if it is gone)."""
    with contextlib.suppress(OSError):
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return ""


def _children() -> dict[int, list[int]]:
    """Every live process's children, by parent pid."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                # The parent pid is the 2nd field after the command name, which may hold spaces.
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    return children


def with_descendants(pids: Iterable[int]) -> list[int]:
    """`pids` and every live descendant of them, each once, parents first."""
    children = _children()
    found: list[int] = []
    seen: set[int] = set()
    pending = list(pids)
    while pending:
        pid = pending.pop(0)
        if pid not in seen:
            seen.add(pid)
            found.append(pid)
            pending.extend(children.get(pid, []))
    return found


def footprint(owners: Mapping[str, Iterable[int]]) -> list[ProcessMemory]:
    """Each live process of each owner, descendants included, counted once (first owner)."""
    rows: list[ProcessMemory] = []
    seen: set[int] = set()
    for owner, pids in owners.items():
        for pid in with_descendants(pids):
            if pid not in seen:
                seen.add(pid)
                rows.append(ProcessMemory(owner, pid, command_of(pid), pss_bytes(pid)))
    return [row for row in rows if row.command]
