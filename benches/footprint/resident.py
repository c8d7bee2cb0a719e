#!/usr/bin/env python3
"""Where a running `weir` keeps its file-backed memory: resident pages of its binary, by crate.

Idle RSS is mostly the binary's own pages that the kernel has mapped into the process
(see README.md's performance section). This reads which of them are resident from
/proc/PID/pagemap and names the code on each page from the binary's symbol table, so a
change that touches less code shows up as fewer MiB under the crate it spared.

    python3 benches/footprint/resident.py PID [BINARY_WITH_SYMBOLS]
    python3 benches/footprint/resident.py --page-out PID

PID is a running `weir`; reading another process's pagemap needs root. BINARY defaults to
the process's own executable and must have a symbol table (`CARGO_PROFILE_DIST_STRIP=false`
when building it); a stripped copy may be what runs, as long as both come from one build.

`--page-out` asks the kernel to reclaim the process's pages of its binary now
(process_madvise with MADV_PAGEOUT, Linux 5.10 or later, as root), as memory pressure
would. What is resident again a while later is the code the process still runs: its
working set, apart from what start-up touched once.
"""

import bisect
import ctypes
import os
import re
import struct
import subprocess
import sys
from collections import defaultdict

PAGE = os.sysconf("SC_PAGE_SIZE")


def load_segments(binary):
    """(file offset, vaddr, file size) of each PT_LOAD segment."""
    out = subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True, check=True).stdout
    segments = []
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == "LOAD":
            segments.append((int(fields[1], 16), int(fields[2], 16), int(fields[4], 16)))
    return segments


def sections(binary):
    """(start vaddr, end vaddr, name) of each allocated section."""
    out = subprocess.run(["readelf", "-SW", binary], capture_output=True, text=True, check=True).stdout
    found = []
    for match in re.finditer(r"\]\s+(\S+)\s+\S+\s+([0-9a-f]{16})\s+[0-9a-f]+\s+([0-9a-f]+)", out):
        name, addr, size = match.group(1), int(match.group(2), 16), int(match.group(3), 16)
        if addr and size:
            found.append((addr, addr + size, name))
    return sorted(found)


def crate_of(symbol):
    """The crate a demangled Rust symbol's code belongs to (the implementing type's crate)."""
    symbol = symbol.lstrip("<&* ")
    symbol = re.sub(r"^(dyn |impl |mut |const )+", "", symbol)
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", symbol)
    return match.group(0) if match else "?"


def symbols(binary):
    out = subprocess.run(
        ["nm", "-C", "--defined-only", "-S", binary], capture_output=True, text=True, check=True
    ).stdout
    table = []
    for line in out.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[2] in "tTrRdDbBvVwW":
            table.append((int(parts[0], 16), int(parts[1], 16), crate_of(parts[3])))
    table.sort()
    return table


def resident_pages(pid, executable):
    """Virtual addresses of the resident pages of each mapping of `executable`, with its file offset."""
    maps = binary_mappings(pid, executable)
    pages = []
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for start, end, offset in maps:
            pagemap.seek(start // PAGE * 8)
            entries = pagemap.read((end - start) // PAGE * 8)
            for index in range((end - start) // PAGE):
                (entry,) = struct.unpack_from("<Q", entries, index * 8)
                if entry >> 63:
                    pages.append(offset + index * PAGE)
    return pages


def binary_mappings(pid, executable):
    """(start, end, file offset) of each mapping of `executable` in process `pid`."""
    maps = []
    with open(f"/proc/{pid}/maps") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) >= 6 and os.path.realpath(fields[5]) == executable:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                maps.append((start, end, int(fields[2], 16)))
    return maps


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def page_out(pid):
    """Reclaim process `pid`'s pages of its own binary; returns the bytes advised."""
    sys_pidfd_open, sys_process_madvise, madv_pageout = 434, 440, 21  # x86_64 and aarch64 alike
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(sys_pidfd_open, int(pid), 0)
    if pidfd < 0:
        sys.exit(f"pidfd_open({pid}): {os.strerror(ctypes.get_errno())}")
    advised = 0
    try:
        for start, end, _ in binary_mappings(pid, os.path.realpath(f"/proc/{pid}/exe")):
            vector = IoVec(start, end - start)
            done = libc.syscall(sys_process_madvise, pidfd, ctypes.byref(vector), 1, madv_pageout, 0)
            if done < 0:
                sys.exit(f"process_madvise({pid}): {os.strerror(ctypes.get_errno())}")
            advised += done
    finally:
        os.close(pidfd)
    return advised


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "--page-out" and len(sys.argv) == 3:
        print(f"paged out {page_out(sys.argv[2]) / 2**20:.1f} MiB of mappings")
        return
    pid = sys.argv[1]
    executable = os.path.realpath(f"/proc/{pid}/exe")
    binary = sys.argv[2] if len(sys.argv) > 2 else executable
    segments = load_segments(binary)
    table = symbols(binary)
    starts = [entry[0] for entry in table]
    section_list = sections(binary)
    section_starts = [entry[0] for entry in section_list]
    by_owner = defaultdict(int)
    for file_offset in resident_pages(pid, executable):
        vaddr = None
        for seg_offset, seg_vaddr, seg_size in segments:
            if seg_offset <= file_offset < seg_offset + max(seg_size, PAGE):
                vaddr = file_offset - seg_offset + seg_vaddr
                break
        if vaddr is None:
            by_owner["(headers)"] += PAGE
            continue
        # A page is charged to the crates whose symbols overlap it, in proportion.
        shares = defaultdict(int)
        i = max(bisect.bisect_right(starts, vaddr) - 1, 0)
        while i < len(table) and table[i][0] < vaddr + PAGE:
            start, size, crate = table[i]
            overlap = min(start + size, vaddr + PAGE) - max(start, vaddr)
            if overlap > 0:
                shares[crate] += overlap
            i += 1
        covered = sum(shares.values())
        if covered == 0:
            j = bisect.bisect_right(section_starts, vaddr) - 1
            name = section_list[j][2] if j >= 0 and vaddr < section_list[j][1] else "(unnamed)"
            by_owner[name] += PAGE
            continue
        for crate, overlap in shares.items():
            by_owner[crate] += PAGE * overlap / covered
    total = sum(by_owner.values())
    print(f"resident pages of {executable}: {total / 2**20:.1f} MiB")
    for owner, size in sorted(by_owner.items(), key=lambda item: -item[1])[:40]:
        print(f"{size / 2**20:8.2f} MiB  {owner}")


if __name__ == "__main__":
    main()
