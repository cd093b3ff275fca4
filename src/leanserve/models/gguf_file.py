"""A GGUF file's metadata and tensors, read in one pass over its header.

`gguf.GGUFReader` (the gguf package's reader) builds a numpy memmap view for every part of
every metadata field: SmolLM2's vocabulary and merges (~98k strings) took it ~5 s, most of
the built-in model's ~8.5 s load. Here the header is parsed with `struct` from one bytes
object (~0.1 s) and the tensors are views of the memory-mapped file. The values are what
`GGUFReader`'s `field.contents()` gives: Python str/int/float/bool, lists for arrays.

Quantized tensors dequantize to float32 with torch for the common block formats (Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0: the same arithmetic as ggml's reference dequantizers) and through
`gguf.quants` for the others. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# metadata value types: struct format of the scalar ones
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: the fastest-varying dimension first
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # the raw bytes (uint8), a view of the mapped file

    def to_torch(self) -> torch.Tensor:
        """float32, in torch's order (the reverse of `shape`); a copy, never a view of the file."""
        return dequantize(self.data, self.tensor_type).reshape(tuple(reversed(self.shape)))


class GGUFFile:
    """`fields`: key -> value; `tensors`: in the file's order. Raises ValueError (or struct.error)
    on a file that is not GGUF or is cut short."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # kept alive by the tensors' views
        if buf[:4] != MAGIC:
            raise ValueError(f"not a GGUF file (magic {bytes(buf[:4])!r})")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        self._buf, self._pos = buf, 24
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._u32())
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = struct.unpack_from("<I", buf, self._pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, self._pos + 4)
            kind, offset = struct.unpack_from("<IQ", buf, self._pos + 4 + 8 * n_dims)
            self._pos += 4 + 8 * n_dims + 12
            infos.append((name, dims, GGMLQuantizationType(kind), offset))
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        start = (self._pos + alignment - 1) // alignment * alignment
        whole = np.frombuffer(buf, dtype=np.uint8)
        self.tensors = []
        for name, dims, kind, offset in infos:
            block, type_size = GGML_QUANT_SIZES[kind]
            n = int(np.prod(dims, dtype=np.int64))
            if n % block:
                raise ValueError(f"tensor {name}: {n} elements is not a multiple of {kind.name}'s block of {block}")
            end = start + offset + n // block * type_size
            if end > len(whole):
                raise ValueError(f"tensor {name} ends at byte {end}, past the end of the file ({len(whole)} bytes)")
            self.tensors.append(GGUFTensor(name, tuple(int(d) for d in dims), kind, whole[start + offset:end]))
        del self._buf

    def _u32(self) -> int:
        (v,) = struct.unpack_from("<I", self._buf, self._pos)
        self._pos += 4
        return v

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._buf, self._pos)
        start = self._pos + 8
        if start + n > len(self._buf):
            raise ValueError(f"a string at byte {self._pos} runs past the end of the file")
        self._pos = start + n
        return str(self._buf[start:start + n], "utf-8")

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = struct.unpack_from("<IQ", self._buf, self._pos)
            self._pos += 12
            if item in _NUMPY:  # numbers in one read
                size = np.dtype(_NUMPY[item]).itemsize
                values = np.frombuffer(self._buf, _NUMPY[item], count, self._pos)
                self._pos += size * count
                return values.tolist()
            return [self._value(item) for _ in range(count)]
        if kind in _SCALARS:
            fmt = "<" + _SCALARS[kind]
            (v,) = struct.unpack_from(fmt, self._buf, self._pos)
            self._pos += struct.calcsize(fmt)
            return v
        raise ValueError(f"unknown GGUF value type {kind} at byte {self._pos}")


def _halves(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 scale at byte `at` of each block, as float32 [n_blocks, 1]."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """ggml's 4-bit layout: a block's 32 values are the 16 low nibbles, then the 16 high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _fifth_bits(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """Q5's high bits: a little-endian uint32 at byte `at`, bit j for value j, as 0 / 16."""
    qh = blocks[:, at:at + 4].to(torch.int64)
    word = qh[:, 0] | qh[:, 1] << 8 | qh[:, 2] << 16 | qh[:, 3] << 24
    return ((word[:, None] >> torch.arange(32)) & 1).to(torch.uint8) << 4


def _dequantize_blocks(blocks: torch.Tensor, kind: GGMLQuantizationType) -> torch.Tensor | None:
    """[n_blocks, type_size] uint8 -> [n_blocks, 32] float32 for the formats written out here."""
    if kind == GGMLQuantizationType.Q8_0:  # d, 32 x int8
        return _halves(blocks, 0) * blocks[:, 2:].view(torch.int8).float()
    if kind == GGMLQuantizationType.Q4_0:  # d, 16 bytes of nibbles; (q - 8) * d
        return _halves(blocks, 0) * (_nibbles(blocks[:, 2:]).float() - 8)
    if kind == GGMLQuantizationType.Q4_1:  # d, m, nibbles; q * d + m
        return _halves(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _halves(blocks, 2)
    if kind == GGMLQuantizationType.Q5_0:  # d, 4 bytes of fifth bits, nibbles; (q - 16) * d
        q = _nibbles(blocks[:, 6:]) | _fifth_bits(blocks, 2)
        return _halves(blocks, 0) * (q.float() - 16)
    if kind == GGMLQuantizationType.Q5_1:  # d, m, fifth bits, nibbles; q * d + m
        q = _nibbles(blocks[:, 8:]) | _fifth_bits(blocks, 4)
        return _halves(blocks, 0) * q.float() + _halves(blocks, 2)
    return None


def dequantize(data: np.ndarray, kind: GGMLQuantizationType) -> torch.Tensor:
    """Raw tensor bytes -> a flat float32 tensor of their values (a new tensor)."""
    raw = torch.from_numpy(np.array(data, dtype=np.uint8))  # a copy: the mapped file is read-only
    if kind == GGMLQuantizationType.F32:
        return raw.view(torch.float32)
    if kind == GGMLQuantizationType.F16:
        return raw.view(torch.float16).float()
    if kind == GGMLQuantizationType.BF16:
        return raw.view(torch.bfloat16).float()
    block, type_size = GGML_QUANT_SIZES[kind]
    out = _dequantize_blocks(raw.view(-1, type_size), kind) if block == 32 else None
    if out is None:
        out = torch.from_numpy(np.array(quants.dequantize(data, kind), dtype=np.float32))
    return out.reshape(-1)
