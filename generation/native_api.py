"""The native kernels' interface, declared once: every entry point's arguments and the constants the C++
shares with Python.

From these declarations come both sides of the boundary: the C header the kernels are compiled against
(``render_header``; the compiler refuses a definition that disagrees with its declaration), and the
ctypes bindings (``bind``), whose every call checks its tensors against the declaration (dtype,
contiguity, device, element count from the call's int arguments) and the kernel's requirements before
any pointer crosses, raising ``ValueError`` naming the kernel and the argument.
"""

from __future__ import annotations

import ctypes
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

import torch

MAX_HEADS = 64  # self-attention keeps a few values per head on the kernel's stack
UPSAMPLE_STRIDES = (2, 3, 4, 5, 6, 8)  # upsample_f32 has register blocks for these (kernels/encodec.cpp)
MAX_HEAD_SIZE = 256  # and, over int8 caches, the query's heads as ints
CONSTANTS = {"MAX_HEADS": MAX_HEADS, "MAX_HEAD_SIZE": MAX_HEAD_SIZE}

_ELEMENT = {
    torch.bfloat16: "uint16_t",
    torch.float32: "float",
    torch.int64: "int64_t",
    torch.int32: "int32_t",
    torch.int8: "int8_t",
    torch.uint8: "uint8_t",
}
_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in _ELEMENT} | {
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
}


@dataclass(frozen=True)
class Tensor:
    """A pointer to a tensor's data: ``size`` is its element count, an expression of the call's other
    arguments (its ints, the structs' fields, ``CONSTANTS``, the library's scratch-size functions)."""

    name: str
    dtype: torch.dtype
    size: str
    writes: bool = False
    optional: bool = False  # may be None: a null pointer
    at_least: bool = False  # working memory: the size is a minimum

    @property
    def c_type(self) -> str:
        return f"{'' if self.writes else 'const '}{_ELEMENT[self.dtype]}*"


@dataclass(frozen=True)
class Int:
    name: str
    c_type: str = "int"


@dataclass(frozen=True)
class Float:
    """A finite number, passed as a C float."""

    name: str
    c_type: str = "float"


@dataclass(frozen=True)
class Struct:
    """A pointer to one struct (``count`` None) or to an array of ``count`` of them."""

    name: str
    struct: type[ctypes.Structure]
    count: str | None = None

    @property
    def c_type(self) -> str:
        return f"const {self.struct.__name__}*"


Arg = Tensor | Int | Float | Struct


def _ints(names: str) -> tuple[Int, ...]:
    return tuple(Int(name) for name in names.split())


@dataclass(frozen=True)
class Kernel:
    """One entry point: its arguments in order, what it returns (``int`` or nothing) and the conditions
    on its arguments without which it would read or write out of bounds."""

    name: str
    args: tuple[Arg, ...]
    returns: str = "void"
    requires: tuple[str, ...] = ()
    amx: bool = False  # runs only after amx_enable() gave 1
    _codes: dict[str, CodeType] = field(default_factory=dict, compare=False, repr=False)

    def code(self, expression: str) -> CodeType:
        compiled = self._codes.get(expression)
        if compiled is None:
            compiled = self._codes[expression] = compile(expression, f"<{self.name}>", "eval")
        return compiled

    def declaration(self) -> str:
        args = ", ".join(f"{a.c_type} {a.name}" for a in self.args) or "void"
        return f"{self.returns} {self.name}({args});"


_p, _f = ctypes.c_void_p, ctypes.c_float
_BF16, _FP32, _INT64, _INT8, _UINT8 = torch.bfloat16, torch.float32, torch.int64, torch.int8, torch.uint8
_INT32 = torch.int32
_LAYER_WEIGHTS = (
    *("ln1_w", "ln1_b", "qkv", "out", "ln2_w", "ln2_b", "cross_q", "cross_out"),
    *("ln3_w", "ln3_b", "fc1", "fc2"),
)


class StepLayer(ctypes.Structure):
    """One decoder layer for ``decoder_step``: weights packed by ``pack_linear_weight`` (or, with the
    model's ``int8``, by ``pack_linear_int8``), norms as (weight, bias, eps), the self-attention caches
    (rows, capacity, hidden) bf16 (with ``int8``: (rows, capacity, hidden + 4 * heads) bytes, as
    ``attend_int8`` takes them) and, or null without cross-attention, the text's keys and values
    (cross_rows, text, hidden) bf16 (with the model's ``int8`` and ``cross_lengths``: int8 caches of
    (cross_rows, text, hidden + 4 * heads) bytes, as ``cross_attend_int8`` takes them)."""

    _fields_ = [
        *((name, _p) for name in _LAYER_WEIGHTS),
        *((name, _f) for name in ("eps1", "eps2", "eps3")),
        *((name, _p) for name in ("keys", "values", "cross_keys", "cross_values")),
    ]
    _c_types_ = {
        "keys": "void*",  # written (bf16, or with the model's int8 as attend_int8's caches); the rest is read
        "values": "void*",
        **{
            name: "const void*"
            for name in ("qkv", "out", "cross_q", "cross_out", "fc1", "fc2", "cross_keys", "cross_values")
        },
    }


class StepModel(ctypes.Structure):
    """The model-wide part of ``decoder_step``'s arguments: sizes, the codebooks' embedding tables (vocab
    + 1, hidden), positions (positions, hidden), the final norm, the packed LM heads (codebooks * vocab,
    hidden) and the cross-attention mask (cross_rows, text) fp32 or null. ``amx``: the products run on
    tiles; ``int8``: every matrix is a packed int8 one (``pack_linear_int8``) and the self-attention
    caches are int8. ``cross_lengths`` (cross_rows,) int32, or null: row r attends its first
    cross_lengths[r] positions of the text (no mask then), and with ``int8`` the layers' text keys and
    values are int8 caches (cross_rows, text, hidden + 4 * heads) bytes, as ``cross_attend_int8`` takes
    them, text a multiple of 4."""

    _fields_ = [
        *((name, ctypes.c_int) for name in ("layers", "hidden", "heads", "ffn", "codebooks", "vocab")),
        *((name, ctypes.c_int) for name in ("capacity", "text", "amx", "int8")),
        ("embeddings", ctypes.POINTER(ctypes.c_void_p)),
        *((name, _p) for name in ("positions", "final_w", "final_b")),
        ("final_eps", _f),
        *((name, _p) for name in ("lm_head", "cross_mask", "cross_lengths")),
    ]
    _c_types_ = {
        "embeddings": "const uint16_t* const*",
        "lm_head": "const void*",
        "cross_mask": "const float*",
        "cross_lengths": "const int32_t*",
    }


STRUCTS = (StepLayer, StepModel)

_linear_args: tuple[Arg, ...] = (
    Tensor("packed", _BF16, "N * K"),
    Tensor("x", _BF16, "M * K"),
    Tensor("residual", _BF16, "M * N", optional=True),
    Tensor("y", _BF16, "M * N", writes=True),
    *_ints("M N K act threads"),
)
_linear_requires = ("M > 0", "N > 0 and N % 32 == 0", "K > 0 and K % 2 == 0", "act in (0, 1)", "threads > 0")
_INT8_MATRIX = "N * K + 8 * N"  # panels, then fp32 scales and int32 column sums
_linear_int8_args: tuple[Arg, ...] = (
    Tensor("packed", _INT8, _INT8_MATRIX),
    Tensor("x", _BF16, "M * K"),
    Tensor("residual", _BF16, "M * N", optional=True),
    Tensor("y", _BF16, "M * N", writes=True),
    Tensor("scratch", _UINT8, "M * (K + 8)", writes=True, at_least=True),
    *_ints("M N K act threads"),
)
_linear_int8_requires = (*_linear_requires[:2], "K > 0 and K % 64 == 0", *_linear_requires[3:])
_attention_requires = (
    "0 < heads <= MAX_HEADS",
    "D > 0 and D % 32 == 0 and D <= MAX_HEAD_SIZE",
    "threads > 0",
)
_INT8_POSITION = "(heads * D + 4 * heads)"  # an int8 cache's bytes a position: the ints, then fp32 scales
_conv_out = "rows > 0", "threads > 0", "activate in (0, 1)"


def _self_attention(name: str, cache: torch.dtype, position: str, *requires: str) -> Kernel:
    """A step of self-attention over position-major caches of ``position`` elements a position."""
    return Kernel(
        name,
        (
            Tensor("qkv", _BF16, "rows * 3 * heads * D"),
            Tensor("keys", cache, f"rows * capacity * {position}", writes=True),
            Tensor("values", cache, f"rows * capacity * {position}", writes=True),
            Tensor("out", _BF16, "rows * heads * D", writes=True),
            Tensor(
                "scratch", _FP32, "threads * attend_scratch(heads, D, capacity)", writes=True, at_least=True
            ),
            *_ints("rows heads D capacity pos threads"),
        ),
        requires=("rows > 0", "0 <= pos < capacity", *_attention_requires, *requires),
    )


KERNELS = (
    Kernel(
        "pack_linear_weight",
        (Tensor("W", _BF16, "N * K"), Tensor("packed", _BF16, "N * K", writes=True), *_ints("N K")),
        requires=("N > 0 and N % 32 == 0", "K > 0 and K % 2 == 0"),
    ),
    Kernel("linear_bf16", _linear_args, requires=_linear_requires),
    Kernel("linear_amx_bf16", _linear_args, requires=(*_linear_requires, "K % 32 == 0"), amx=True),
    Kernel(
        "pack_linear_int8",
        (
            Tensor("W", _INT8, "N * K"),
            Tensor("scales", _FP32, "N"),
            Tensor("packed", _INT8, _INT8_MATRIX, writes=True),
            *_ints("N K"),
        ),
        requires=("N > 0 and N % 32 == 0", "K > 0 and K % 64 == 0"),
    ),
    Kernel("linear_int8", _linear_int8_args, requires=_linear_int8_requires),
    Kernel("linear_amx_int8", _linear_int8_args, requires=_linear_int8_requires, amx=True),
    Kernel("amx_enable", (), returns="int"),
    # 512 where the library was built for AVX-512, 256 where its vectors are AVX2 pairs (kernels/avx2.h)
    Kernel("vector_bits", (), returns="int"),
    Kernel("attend_scratch", _ints("heads D capacity"), returns="int"),
    _self_attention("attend_bf16", _BF16, "heads * D"),
    # int8 values lie four positions together (a quad): whole quads
    _self_attention("attend_int8", _INT8, _INT8_POSITION, "capacity % 4 == 0"),
    Kernel(
        "quantize_cache",
        (
            Tensor("x", _BF16, "n * heads * D"),
            Tensor("cache", _INT8, f"(n + 3) // 4 * 4 * {_INT8_POSITION}", writes=True),  # whole quads
            *_ints("n heads D keys"),
        ),
        requires=("n > 0", "keys in (0, 1)", *_attention_requires[:2]),
    ),
    Kernel(
        "cross_attend_bf16",
        (
            Tensor("q", _BF16, "rows * heads * D"),
            Tensor("keys", _BF16, "rows * n * heads * D"),
            Tensor("values", _BF16, "rows * n * heads * D"),
            Tensor("mask", _FP32, "rows * n", optional=True),
            Tensor("out", _BF16, "rows * heads * D", writes=True),
            Tensor("scratch", _FP32, "threads * attend_scratch(heads, D, n)", writes=True, at_least=True),
            *_ints("rows heads D n threads"),
        ),
        requires=("rows > 0", "n > 0", *_attention_requires),
    ),
    Kernel(
        "cross_attend_int8",
        (
            Tensor("q", _BF16, "rows * heads * D"),
            Tensor("keys", _INT8, f"rows * capacity * {_INT8_POSITION}"),
            Tensor("values", _INT8, f"rows * capacity * {_INT8_POSITION}"),
            Tensor("lengths", _INT32, "rows"),
            Tensor("out", _BF16, "rows * heads * D", writes=True),
            Tensor(
                "scratch", _FP32, "threads * attend_scratch(heads, D, capacity)", writes=True, at_least=True
            ),
            *_ints("rows heads D capacity threads"),
        ),
        requires=("rows > 0", "capacity > 0 and capacity % 4 == 0", *_attention_requires),
    ),
    Kernel("step_work", _ints("rows hidden ffn"), returns="int"),
    Kernel(
        "decoder_step",
        (
            Struct("m", StepModel),
            Struct("layers", StepLayer, count="m.layers"),
            Tensor("tokens", _INT64, "rows * m.codebooks"),
            Tensor("x", _BF16, "rows * m.hidden", writes=True),
            Tensor("logits", _BF16, "rows * m.codebooks * m.vocab", writes=True),
            Tensor("work", _BF16, "step_work(rows, m.hidden, m.ffn)", writes=True, at_least=True),
            Tensor(
                "scratch",
                _FP32,
                "threads * attend_scratch(m.heads, m.hidden // m.heads, max(m.capacity, m.text))",
                writes=True,
                at_least=True,
            ),
            *_ints("rows cross_rows position threads"),
        ),
        requires=(
            "0 < m.heads <= MAX_HEADS",
            "m.hidden % m.heads == 0 and (m.hidden // m.heads) % 32 == 0",
            "m.hidden // m.heads <= MAX_HEAD_SIZE",
            "m.hidden > 0 and m.hidden % 32 == 0 and m.ffn > 0 and m.ffn % 32 == 0",
            "(m.codebooks * m.vocab) % 32 == 0 and m.codebooks > 0",
            "m.layers > 0",
            "m.int8 in (0, 1) and (not m.int8 or (m.hidden % 64 == 0 and m.ffn % 64 == 0))",
            "rows > 0 and 0 <= cross_rows <= rows",
            # with lengths no mask; int8 text caches hold whole quads (a row reads to its length rounded up)
            "not m.cross_lengths or (not m.cross_mask and m.text > 0 and (not m.int8 or m.text % 4 == 0))",
            "0 <= position < m.capacity",
            "threads > 0",
        ),
    ),
    Kernel("sample_scratch", _ints("vocab"), returns="int"),
    Kernel(
        "sample_tokens",
        (
            Tensor("logits", _BF16, "(guided + 1) * rows * codebooks * vocab"),
            Tensor("draws", _FP32, "rows * codebooks"),
            Tensor("tokens", _INT64, "rows * codebooks", writes=True),
            Tensor("scratch", _FP32, "threads * sample_scratch(vocab)", writes=True, at_least=True),
            *_ints("rows guided codebooks vocab"),
            Float("guidance"),
            Float("temperature"),
            *_ints("k threads"),
        ),
        returns="int",
        requires=(
            "rows > 0 and codebooks > 0 and vocab > 0",
            "guided in (0, 1)",
            "temperature > 0",
            "0 <= k",
            "threads > 0",
        ),
    ),
    Kernel(
        "pack_lstm",
        (Tensor("W", _FP32, "4 * H * H"), Tensor("packed", _FP32, "4 * H * H", writes=True), Int("H")),
        requires=("H > 0 and H % 16 == 0",),
    ),
    Kernel(
        "lstm_f32",
        (
            Tensor("pre", _FP32, "T * B * 4 * H"),
            Tensor("packed", _FP32, "4 * H * H"),
            Tensor("out", _FP32, "T * B * H", writes=True),
            Tensor("cell", _FP32, "B * H", writes=True),
            *_ints("T B H threads"),
        ),
        requires=("T > 0", "B > 0", "H > 0 and H % 16 == 0", "threads > 0"),
    ),
    Kernel("resblock_scratch", _ints("C H"), returns="int"),
    Kernel(
        "resblock_f32",
        (
            Tensor("x", _FP32, "rows * C * T"),
            Tensor("y", _FP32, "rows * C * T", writes=True),
            Tensor("w1", _FP32, "H * C * 3"),
            Tensor("b1", _FP32, "H"),
            Tensor("w2", _FP32, "C * H"),
            Tensor("b2", _FP32, "C"),
            Tensor("scratch", _FP32, "threads * resblock_scratch(C, H)", writes=True, at_least=True),
            *_ints("rows C H T threads"),
        ),
        requires=("rows > 0", "C > 0 and C % 4 == 0", "H > 0 and H % 4 == 0", "T >= 2", "threads > 0"),
    ),
    Kernel("upsample_scratch", _ints("Cin"), returns="int"),
    Kernel(
        "upsample_f32",
        (
            Tensor("x", _FP32, "rows * Cin * T"),
            Tensor("y", _FP32, "rows * Cout * S * T", writes=True),
            Tensor("w", _FP32, "(Cout + 15) // 16 * 16 * Cin * 2 * S"),
            Tensor("b", _FP32, "Cout"),
            Tensor("scratch", _FP32, "threads * upsample_scratch(Cin)", writes=True, at_least=True),
            *_ints("rows Cin Cout T S left activate threads"),
        ),
        requires=(*_conv_out, "Cin > 0", "Cout > 0", "T > 0", f"S in {UPSAMPLE_STRIDES}", "0 <= left <= S"),
    ),
    Kernel("narrow_scratch", _ints("C"), returns="int"),
    Kernel(
        "narrow_conv_f32",
        (
            Tensor("x", _FP32, "rows * C * T"),
            Tensor("y", _FP32, "rows * O * T", writes=True),
            Tensor("w", _FP32, "O * C * K"),
            Tensor("b", _FP32, "O"),
            Tensor("scratch", _FP32, "threads * narrow_scratch(C)", writes=True, at_least=True),
            *_ints("rows C O K T left activate threads"),
        ),
        requires=(
            *_conv_out,
            "C > 0",
            "0 < O <= 4",
            "0 < K <= 17",
            "0 <= left < K",
            "T > max(left, K - 1 - left)",
        ),
    ),
    Kernel(
        "pack_amx_conv",
        (
            Tensor("W", _FP32, "taps * M * K"),
            Tensor("hi", _BF16, "taps * M * K", writes=True),
            Tensor("lo", _BF16, "taps * M * K", writes=True),
            *_ints("taps M K"),
        ),
        requires=("taps > 0", "M > 0 and M % 16 == 0", "K > 0 and K % 32 == 0"),
    ),
    Kernel("resblock_amx_scratch", _ints("C H"), returns="int"),
    Kernel(
        "resblock_amx",
        (
            Tensor("x", _FP32, "rows * C * T"),
            Tensor("y", _FP32, "rows * C * T", writes=True),
            Tensor("w1hi", _BF16, "3 * H * C"),
            Tensor("w1lo", _BF16, "3 * H * C"),
            Tensor("b1", _FP32, "H"),
            Tensor("w2hi", _BF16, "C * H"),
            Tensor("w2lo", _BF16, "C * H"),
            Tensor("b2", _FP32, "C"),
            Tensor("scratch", _FP32, "threads * resblock_amx_scratch(C, H)", writes=True, at_least=True),
            *_ints("rows C H T threads"),
        ),
        requires=("rows > 0", "C > 0 and C % 32 == 0", "H > 0 and H % 32 == 0", "T >= 2", "threads > 0"),
        amx=True,
    ),
    Kernel("upsample_amx_scratch", _ints("Cin Cout S"), returns="int"),
    Kernel(
        "upsample_amx",
        (
            Tensor("x", _FP32, "rows * Cin * T"),
            Tensor("y", _FP32, "rows * Cout * S * T", writes=True),
            Tensor("whi", _BF16, "2 * S * Cout * Cin"),
            Tensor("wlo", _BF16, "2 * S * Cout * Cin"),
            Tensor("b", _FP32, "Cout"),
            Tensor(
                "scratch", _FP32, "threads * upsample_amx_scratch(Cin, Cout, S)", writes=True, at_least=True
            ),
            *_ints("rows Cin Cout T S left activate threads"),
        ),
        requires=(
            *_conv_out,
            "Cin > 0 and Cin % 32 == 0",
            "Cout > 0 and Cout % 16 == 0",
            "T > 0",
            "S > 0",
            "0 <= left <= S",
        ),
        amx=True,
    ),
)


def render_header() -> str:
    """The C header the kernels are compiled against: the constants, the structs and every entry point."""
    lines = [
        "// Generated from generation/native_api.py, the one declaration of the native interface.",
        "#pragma once",
        "#include <stdint.h>",
        "",
        *(f"#define MUSICBOT_{name} {value}" for name, value in CONSTANTS.items()),
        "",
        'extern "C" {',
        "",
    ]
    for struct in STRUCTS:
        c_types: dict[str, str] = getattr(struct, "_c_types_", {})
        lines.append(f"struct {struct.__name__} {{")
        for name, ctype, *_ in struct._fields_:
            default = {ctypes.c_int: "int", ctypes.c_float: "float"}.get(ctype, "const uint16_t*")
            lines.append(f"    {c_types.get(name, default)} {name};")
        lines += ["};", ""]
    lines += [kernel.declaration() for kernel in KERNELS]
    lines += ["", '}  // extern "C"', ""]
    return "\n".join(lines)


def _ctype(arg: Arg) -> Any:
    if isinstance(arg, Int):
        return ctypes.c_int
    if isinstance(arg, Float):
        return ctypes.c_float
    if isinstance(arg, Struct):
        return ctypes.POINTER(arg.struct)
    return ctypes.c_void_p


_RESULTS = {"void": None, "int": ctypes.c_int}


class Bound:
    """One entry point of a loaded library, called with tensors, ints and structs in the declared order;
    each call checked against the declaration before it crosses."""

    def __init__(self, kernel: Kernel, function: Any, sizes: dict[str, Callable[..., int]]) -> None:
        function.argtypes = [_ctype(a) for a in kernel.args]
        function.restype = _RESULTS[kernel.returns]
        self.kernel, self._function, self._sizes = kernel, function, sizes
        self._requires = [(text, kernel.code(text)) for text in kernel.requires]
        self._tensors = [
            (i, a, kernel.code(a.size)) for i, a in enumerate(kernel.args) if isinstance(a, Tensor)
        ]
        self._structs = [(i, a) for i, a in enumerate(kernel.args) if isinstance(a, Struct)]
        self._ints = [(i, a.name) for i, a in enumerate(kernel.args) if isinstance(a, Int)]
        self._floats = [(i, a.name) for i, a in enumerate(kernel.args) if isinstance(a, Float)]

    def __call__(self, *values: Any) -> Any:
        kernel = self.kernel
        if len(values) != len(kernel.args):
            raise TypeError(f"{kernel.name}: {len(values)} arguments for its {len(kernel.args)}")
        scope: dict[str, Any] = {"__builtins__": {"max": max, "min": min}, **CONSTANTS, **self._sizes}
        for i, name in self._ints:
            value = values[i]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{kernel.name}: {name}: {value!r} is not an int")
            if not -(2**31) <= value < 2**31:
                raise ValueError(f"{kernel.name}: {name}: {value} does not fit a C int")
            scope[name] = value
        for i, name in self._floats:
            value = values[i]
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{kernel.name}: {name}: {value!r} is not a finite number")
            scope[name] = value
        converted = list(values)
        for i, arg in self._structs:
            converted[i] = self._struct(arg, values[i], scope)
        for text, code in self._requires:
            if not eval(code, scope):  # our own declarations, compiled once
                raise ValueError(f"{kernel.name}: needs {text} ({_named(text, scope)})")
        for i, tensor, size in self._tensors:
            converted[i] = self._pointer(tensor, values[i], eval(size, scope))
        return self._function(*converted)

    def _struct(self, arg: Struct, value: Any, scope: dict[str, Any]) -> Any:
        name = f"{self.kernel.name}: {arg.name}"
        if arg.count is None:
            if not isinstance(value, arg.struct):
                raise ValueError(f"{name}: {type(value).__name__} is not a {arg.struct.__name__}")
            scope[arg.name] = value
            return ctypes.byref(value)
        count = eval(self.kernel.code(arg.count), scope)
        if not isinstance(value, ctypes.Array) or value._type_ is not arg.struct or len(value) != count:
            raise ValueError(f"{name}: not an array of {arg.count} = {count} {arg.struct.__name__}")
        return value

    def _pointer(self, arg: Tensor, value: Any, size: int) -> int | None:
        name = f"{self.kernel.name}: {arg.name}"
        if value is None:
            if arg.optional:
                return None
            raise ValueError(f"{name}: None where the kernel needs a tensor")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: {type(value).__name__} is not a tensor")
        if value.dtype != arg.dtype or value.device.type != "cpu" or not value.is_contiguous():
            raise ValueError(
                f"{name}: {value.dtype} {tuple(value.shape)} on {value.device.type} does not fit the "
                f"kernel's call: it takes a contiguous {_NAMES[arg.dtype]} tensor on the CPU"
            )
        count = value.numel()
        if count < size if arg.at_least else count != size:
            wanted = f"at least {size}" if arg.at_least else str(size)
            raise ValueError(
                f"{name}: {tuple(value.shape)} holds {count} values, the call's {arg.size} is {wanted}"
            )
        if count == 0:
            return None if arg.optional else _empty_pointer(name)
        return int(value.data_ptr())


def _empty_pointer(name: str) -> int:
    raise ValueError(f"{name}: an empty tensor where the kernel reads or writes")


def _named(text: str, scope: dict[str, Any]) -> str:
    """The values of the arguments a requirement names, for its message."""
    names = dict.fromkeys(re.findall(r"[A-Za-z_]\w*", text))
    return ", ".join(f"{name} = {scope[name]}" for name in names if isinstance(scope.get(name), int))


def bind(lib: ctypes.CDLL) -> dict[str, Bound]:
    """Every declared entry point of ``lib``, checked at each call; missing ones raise AttributeError."""
    raw = {k.name: getattr(lib, k.name) for k in KERNELS}
    sizes: dict[str, Callable[..., int]] = {}
    for kernel in KERNELS:
        if kernel.returns == "int" and all(isinstance(a, Int) for a in kernel.args):
            function = raw[kernel.name]
            function.argtypes, function.restype = [ctypes.c_int] * len(kernel.args), ctypes.c_int
            sizes[kernel.name] = function
    return {k.name: Bound(k, raw[k.name], sizes) for k in KERNELS}
