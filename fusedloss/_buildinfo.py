"""What the compiled extension was built for, read from the shared object itself.

The build records nothing at run time, and a wheel may come from another machine, so the facts are read
from the binary: the GPU architectures from the CUDA fat binaries that nvcc embeds (section
``.nv_fatbin``), the CPU vector ISA from the inline namespace of ATen's ``at::vec`` that its kernels
were compiled into (``-DCPU_CAPABILITY=AVX2`` names it ``at::vec::AVX2``; without it ``DEFAULT``).
Each reader returns None where the format is not what it expects: a diagnostic, never an error.
"""

from __future__ import annotations

import functools
import struct

FATBIN_MAGIC = 0xBA55ED50
# Entry kinds in a fat binary: PTX text (JIT-compiled by the driver) or an ELF cubin (SASS).
_KIND = {1: "ptx", 2: "sass"}


def _sections(data: bytes) -> dict[str, tuple[int, int]]:
    """{name: (offset, size)} of a little-endian ELF64 file's sections."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for i in range(shnum):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        headers.append((name, offset, size))
    str_off = headers[shstrndx][1]
    out = {}
    for name, offset, size in headers:
        end = data.index(b"\0", str_off + name)
        out[data[str_off + name:end].decode("ascii", "replace")] = (offset, size)
    return out


def fatbin_archs(data: bytes) -> dict[str, list[int]] | None:
    """{"sass": [80, 90], "ptx": [...]}: the architectures of the code in ``.nv_fatbin``, or None."""
    sec = _sections(data).get(".nv_fatbin")
    if sec is None:
        return None
    pos, end = sec[0], sec[0] + sec[1]
    found: dict[str, set[int]] = {"sass": set(), "ptx": set()}
    while pos + 16 <= end:
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            # fat binaries are 8-byte aligned within the section: skip padding
            pos += 8
            continue
        entry, stop = pos + header_size, pos + header_size + fat_size
        while entry + 32 <= stop:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if kind in _KIND and 10 <= arch < 1000:
                found[_KIND[kind]].add(arch)
            if entry_header == 0:
                break
            entry += entry_header + payload
        pos = stop
    return {k: sorted(v) for k, v in found.items()}


def cpu_vector_isa(data: bytes) -> str | None:
    for isa in ("AVX512", "AVX2", "DEFAULT"):
        tag = f"3vec{len(isa)}{isa}".encode()
        if tag in data:
            return isa
    return None


@functools.lru_cache(maxsize=4)
def read(path: str) -> dict:
    """{"cuda_archs": {...} or None, "cpu_vector_isa": str or None} of the shared object at ``path``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {"cuda_archs": None, "cpu_vector_isa": None}
    try:
        archs = fatbin_archs(data)
    except (struct.error, ValueError, IndexError):
        archs = None
    return {"cuda_archs": archs, "cpu_vector_isa": cpu_vector_isa(data)}


def format_archs(archs: dict[str, list[int]] | None) -> str:
    if not archs:
        return "unknown"
    parts = [f"sm_{a}" for a in archs.get("sass", [])] + [f"compute_{a} (PTX)" for a in archs.get("ptx", [])]
    return ", ".join(parts) or "none"
