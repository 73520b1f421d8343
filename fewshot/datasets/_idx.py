"""Reading IDX files, the array format of MNIST and Fashion-MNIST.

An IDX file (LeCun, Cortes and Burges, "The MNIST database") is a 4-byte magic number
``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian ``uint32`` dimension sizes, then the values in
C order, big-endian. Distributions usually gzip it (``train-images-idx3-ubyte.gz``).
"""

from __future__ import annotations

import gzip
import os

import numpy as np

__all__ = ["read_idx"]

#: IDX type byte -> numpy dtype of the (big-endian) values.
_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a numpy array.

    Parameters
    ----------
    path : str or path-like
        The file. It is read as gzip when it starts with the gzip magic bytes, whatever its name.

    Returns
    -------
    numpy.ndarray
        Shape ``(d_1, ..., d_ndim)`` from the header; dtype from the type byte: ``0x08`` uint8,
        ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64, in the
        machine's byte order. For Fashion-MNIST images that is ``uint8 [n, 28, 28]`` (0 is
        background), for its labels ``uint8 [n]``.

    Raises
    ------
    ValueError
        If the file is not IDX: a wrong magic number (the message shows it), an unknown type byte,
        or a size that does not match the header (a truncated file, or trailing bytes).

    Examples
    --------
    >>> from fewshot.datasets import read_idx
    >>> x = read_idx("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")  # doctest: +SKIP
    >>> x.shape, x.dtype
    ((60000, 28, 28), dtype('uint8'))
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; a cut gzip stream EOFError
        raise ValueError(f"{path} is not a readable gzip file ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _TYPES or data[3] == 0:
        raise ValueError(
            f"{path} is not an IDX file: its magic number is {data[:4].hex(' ') or 'missing'}, expected "
            f"00 00 <type> <ndim> with type one of {', '.join(f'{t:02x}' for t in _TYPES)} and ndim >= 1"
        )
    dtype, ndim = _TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, {header} expected for "
                         f"{ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: the IDX header says shape {shape} of {dtype.name} ({expected} bytes "
                         f"in all), but the file holds {len(data)} bytes")
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=True)
