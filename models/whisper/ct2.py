"""Reader for CTranslate2's model.bin (binary version 6), numpy only.

Layout: u32 version, string spec name, u32 spec revision, u32 variable count; per variable:
string name, u8 rank, u32 dims[rank], u8 dtype, u32 byte count, raw little-endian data; then
u32 alias count and (alias, target) string pairs. Strings are u16 length (including the
trailing NUL) followed by the bytes.
"""

import struct

import numpy as np

DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class Ct2FormatError(Exception):
    pass


def read_model(path):
    """Returns (spec_name, spec_revision, {name: ndarray}) with aliases resolved."""
    data = open(path, "rb").read()
    offset = 0

    def unpack(fmt):
        nonlocal offset
        values = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return values

    def string():
        nonlocal offset
        (length,) = unpack("<H")
        text = data[offset : offset + length - 1].decode("utf-8")
        offset += length
        return text

    (version,) = unpack("<I")
    if version != 6:
        raise Ct2FormatError(f"{path}: binary version {version}, this reader knows 6")
    spec = string()
    (revision,) = unpack("<I")
    (count,) = unpack("<I")
    variables = {}
    for _ in range(count):
        name = string()
        (rank,) = unpack("<B")
        dims = unpack(f"<{rank}I") if rank else ()
        (dtype_code,) = unpack("<B")
        (nbytes,) = unpack("<I")
        if dtype_code not in DTYPES:
            raise Ct2FormatError(f"{path}: {name} has unknown dtype code {dtype_code}")
        dtype = np.dtype(DTYPES[dtype_code])
        array = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        variables[name] = array.reshape(dims)
        offset += nbytes
    (alias_count,) = unpack("<I")
    for _ in range(alias_count):
        alias = string()
        target = string()
        variables[alias] = variables[target]
    if offset != len(data):
        raise Ct2FormatError(f"{path}: {len(data) - offset} trailing bytes")
    return spec, revision, variables
