"""How a gradient table stores its vectors: float32, float16, or 4-bit codes.

``int4`` rows spend half a byte per number. Each block of a row (a module's
Kronecker rows, or the whole row of a sketch) gets one step size ``s``, the
block's root mean square times ``INT4_STEP``, and each number ``x`` becomes
the code ``k = floor(x / s)`` clipped to ``[-8, 7]``, read back as
``(k + 1/2) s``: the 16-level uniform midrise quantizer whose step Max (1960)
found optimal for a Gaussian, which projected gradients are close to (every
entry is a random signed sum over a whole module). Its error is about 11% of
the block's RMS per number, independent between numbers, so it adds a little
isotropic noise to a projection that is itself random: on the hard fact-tracing
fixture TrackStar keeps its recall to within the projection seeds' spread
(``benchmarks/trackstar_storage.py``).

Table layout: ``grad`` holds the codes packed two to a byte (the even index in
the low nibble, two's complement), ``grad_step`` the float32 steps of the
row's blocks in order. Float rows have the ``grad`` column only.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rayattr.config import RayattrError, SketchType, VectorDtype
from rayattr.space import TableMeta

GRAD = "grad"
STEP = "grad_step"
INT4_STEP = 0.3352  # in units of the block's RMS: Max (1960), the MSE-optimal 16-level step for N(0, 1)
INT4_LEVELS = 8  # codes -8 .. 7
FLOAT_TYPES = {"float16": pa.float16(), "float32": pa.float32()}


@dataclass(frozen=True)
class RowCodec:
    """Encoding and decoding of one table's ``grad`` vectors."""

    dtype: VectorDtype
    dim: int
    widths: tuple[int, ...] = ()  # int4: consecutive blocks of the row, one step each; they sum to ``dim``

    def __post_init__(self) -> None:
        if self.dtype not in typing.get_args(VectorDtype):
            raise RayattrError(f"unknown row dtype {self.dtype!r}; use one of {', '.join(typing.get_args(VectorDtype))}")
        if self.dtype == "int4" and sum(self.widths) != self.dim:
            raise RayattrError(f"int4 blocks {list(self.widths)} do not cover the {self.dim} numbers of a row")

    @classmethod
    def of(cls, meta: TableMeta) -> RowCodec:
        """The codec a table's metadata describes (a sketch is one block, Kronecker rows one per module)."""
        sketched = meta.projection.get("type") in typing.get_args(SketchType) and meta.projection.get("dim")
        widths = (meta.dim,) if sketched else tuple(int(module["width"]) for module in meta.modules)
        return cls(meta.dtype, meta.dim, widths if meta.dtype == "int4" else ())

    @property
    def columns(self) -> list[str]:
        """The table columns that hold the vectors."""
        return [GRAD, STEP] if self.dtype == "int4" else [GRAD]

    def fields(self) -> list[pa.Field]:
        if self.dtype == "int4":
            return [pa.field(GRAD, pa.list_(pa.uint8(), packed_width(self.dim))),
                    pa.field(STEP, pa.list_(pa.float32(), len(self.widths)))]
        return [pa.field(GRAD, pa.list_(FLOAT_TYPES[self.dtype], self.dim))]

    @property
    def bytes_per_row(self) -> int:
        if self.dtype == "int4":
            return packed_width(self.dim) + 4 * len(self.widths)
        return self.dim * np.dtype(self.dtype).itemsize

    def encode(self, values: np.ndarray) -> tuple[np.ndarray, dict[str, pa.Array]]:
        """``(what decoding gives back, the vector columns)`` of float rows ``[n, dim]``."""
        if self.dtype != "int4":
            stored = _to_float(values, np.dtype(self.dtype))
            return stored, {GRAD: _fixed_lists(stored)}
        codes, steps = quantize_int4(np.asarray(values, np.float32), self.widths)
        return (dequantize_int4(codes, steps, self.widths),
                {GRAD: _fixed_lists(pack_nibbles(codes)), STEP: _fixed_lists(steps)})

    def decode(self, batch: pa.Table | pa.RecordBatch) -> np.ndarray:
        """The ``[n, dim]`` vectors of a batch holding this codec's columns (float16, or float32)."""
        if self.dtype != "int4":
            return vectors_of(batch.column(GRAD), self.dim)
        packed = vectors_of(batch.column(GRAD), packed_width(self.dim))
        steps = vectors_of(batch.column(STEP), len(self.widths))
        return dequantize_int4(unpack_nibbles(packed, self.dim), steps, self.widths)


def packed_width(dim: int) -> int:
    """Bytes holding ``dim`` 4-bit codes."""
    return (dim + 1) // 2


def quantize_int4(values: np.ndarray, widths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``int8 [n, dim]`` in ``[-8, 7]`` and steps ``float32 [n, blocks]`` of float rows."""
    starts = np.cumsum((0,) + widths[:-1])
    squares = np.add.reduceat(np.square(values, dtype=np.float64), starts, axis=1) if len(values) else \
        np.zeros((0, len(widths)))
    steps = (np.sqrt(squares / np.asarray(widths)) * INT4_STEP).astype(np.float32)
    per_column = np.repeat(steps, widths, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(per_column > 0, values / per_column, 0.0)
    return np.clip(np.floor(scaled), -INT4_LEVELS, INT4_LEVELS - 1).astype(np.int8), steps


def dequantize_int4(codes: np.ndarray, steps: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """``(k + 1/2) s`` per number, float32."""
    return (codes.astype(np.float32) + 0.5) * np.repeat(steps.astype(np.float32), widths, axis=1)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two codes per byte, the even index in the low nibble; an odd width pads one zero nibble."""
    nibbles = (codes & 0x0F).astype(np.uint8)
    if nibbles.shape[1] % 2:
        nibbles = np.pad(nibbles, ((0, 0), (0, 1)))
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_nibbles(packed: np.ndarray, dim: int) -> np.ndarray:
    """The inverse of ``pack_nibbles``: signed codes ``int8 [n, dim]``."""
    nibbles = np.empty((packed.shape[0], 2 * packed.shape[1]), np.int8)
    nibbles[:, 0::2] = packed & 0x0F
    nibbles[:, 1::2] = packed >> 4
    return ((nibbles[:, :dim] ^ 8) - 8).astype(np.int8)


def vectors_of(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """A fixed-size-list column as an ``[n, dim]`` numpy view (no per-row Python)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def _fixed_lists(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix).reshape(-1)), matrix.shape[1])


def _to_float(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to a float storage dtype, clamping to its finite range (float16 tops out at 65504)."""
    if dtype == np.float32:
        return values.astype(np.float32, copy=False)
    limit = np.finfo(dtype).max
    return np.clip(values, -limit, limit).astype(dtype)
