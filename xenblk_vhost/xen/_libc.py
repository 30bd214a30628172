"""The few libc calls Python's standard library does not offer, via ctypes.

- `ioctl` with a pointer argument: `fcntl.ioctl` copies buffers through a
  1 KiB bounce area and cannot pass a raw address, and the gntdev grant-copy
  argument is a struct that *contains* a pointer to our segment array.
- `mmap` with `MAP_FIXED`: the simulated gntdev must lay several frames of a
  guest's memory side by side at addresses it chooses, like the kernel does
  for a multi-page grant mapping. Python's `mmap.mmap` cannot place a map.
- the address of a buffer, including a read-only one (a `PROT_READ`
  `mmap.mmap`), which ctypes' `from_buffer` refuses.

Also `ioc()`, the kernel's `_IOC()` macro, so ioctl numbers are computed from
their parts instead of being copied as magic numbers (tests compare them with
the kernel's headers compiled by gcc).
"""

from __future__ import annotations

import ctypes
import mmap
import os

_libc = ctypes.CDLL(None, use_errno=True)

_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

_mmap = _libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_mmap.restype = ctypes.c_void_p

MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10  # asm-generic/mman-common.h; Python's mmap module does not export it

# asm-generic/ioctl.h (x86 uses the generic layout): nr 8 bits, type 8 bits,
# size 14 bits, direction 2 bits.
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2


def ioc(direction: int, type_: str, nr: int, size: int) -> int:
    """The kernel's _IOC(dir, type, nr, size)."""
    if not (0 <= nr < 256 and 0 <= size < (1 << 14) and 0 <= direction < 4):
        raise ValueError("ioctl number field out of range")
    return (
        (direction << _IOC_DIRSHIFT)
        | (ord(type_) << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def ioctl(fd: int, request: int, arg_addr: int) -> int:
    """ioctl(fd, request, (void *)arg_addr); raises OSError on failure, else returns its result."""
    rc = _ioctl(fd, request, arg_addr)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def mmap_fixed(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> None:
    """mmap(addr, ...) with MAP_FIXED added: replace whatever is mapped at [addr, addr+length)."""
    got = _mmap(addr, length, prot, flags | MAP_FIXED, fd, offset)
    if got == MAP_FAILED or got is None:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if got != addr:  # cannot happen with MAP_FIXED; a wrong place would be a silent aliasing bug
        raise OSError(f"mmap(MAP_FIXED) placed the map at {got:#x}, not {addr:#x}")


class _PyBuffer(ctypes.Structure):
    # Py_buffer, part of the stable ABI since Python 3.11. Only .buf is read.
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_PyObject_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
_PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_PyObject_GetBuffer.restype = ctypes.c_int
_PyBuffer_Release = ctypes.pythonapi.PyBuffer_Release
_PyBuffer_Release.argtypes = [ctypes.POINTER(_PyBuffer)]
_PyBuffer_Release.restype = None
_PyBUF_SIMPLE = 0


def buffer_address(obj) -> int:
    """Address of the first byte of a buffer-protocol object (read-only ones too).

    The object must outlive every use of the address; this takes no reference.
    """
    view = _PyBuffer()
    if _PyObject_GetBuffer(obj, ctypes.byref(view), _PyBUF_SIMPLE) != 0:
        raise TypeError(f"{type(obj).__name__} does not export a buffer")
    try:
        return view.buf or 0
    finally:
        _PyBuffer_Release(ctypes.byref(view))


class FixedRegion:
    """An address range of our own into which maps are placed with MAP_FIXED.

    It starts as an anonymous private mapping owned by a Python `mmap.mmap`
    (so no file descriptor is duplicated per region, and Python refuses to
    unmap it while memoryviews of it are alive: `close()` raises BufferError
    instead of leaving a dangling view). Pieces are then replaced by shared
    maps of a device or memfd. Unmapping the region unmaps the pieces.

    A read-only region hands out read-only memoryviews, and its pieces are
    mapped PROT_READ, so a write through its address faults as on Xen.
    """

    __slots__ = ("_mm", "addr", "length", "readonly")

    def __init__(self, length: int, *, readonly: bool):
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        self._mm = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=prot)
        self.addr = buffer_address(self._mm)
        self.length = length
        self.readonly = readonly

    @property
    def prot(self) -> int:
        return mmap.PROT_READ if self.readonly else mmap.PROT_READ | mmap.PROT_WRITE

    def place(self, offset: int, length: int, fd: int, file_offset: int) -> None:
        """Map [file_offset, +length) of fd, shared, at addr+offset.

        If the kernel refuses (a failed MAP_FIXED may already have unmapped
        the old range), the range is re-filled with anonymous memory so no
        hole is left for an unrelated map to land in, then the error is raised.
        """
        if offset < 0 or length <= 0 or offset + length > self.length:
            raise ValueError("piece outside the region")
        try:
            mmap_fixed(self.addr + offset, length, self.prot, mmap.MAP_SHARED, fd, file_offset)
        except OSError:
            mmap_fixed(self.addr + offset, length, self.prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            raise

    def view(self) -> memoryview:
        return memoryview(self._mm)

    @property
    def closed(self) -> bool:
        return self._mm.closed

    def close(self) -> None:
        """munmap the whole region. Raises BufferError (and unmaps nothing) while views exist."""
        self._mm.close()
