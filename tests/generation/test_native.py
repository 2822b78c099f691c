"""The native kernels: built for this CPU, equal to the plain computation to bf16 rounding; called only
through checked bindings; loaded only from a private cache."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from generation import native
from generation.loader import cpu_flags
from tests.generation.ownership import give_to_another_user

CAN_BUILD = all(f in cpu_flags() for f in native.REQUIRED_CPU) and shutil.which("g++") is not None
# where this CPU's own build is AVX-512's, the AVX2 build (kernels/avx2.h) is tested beside it
AVX512_HERE = CAN_BUILD and all(f in cpu_flags() for f in native.AVX512_CPU)
ALSO_AVX2 = pytest.mark.skipif(not AVX512_HERE, reason="this CPU's own build is AVX2's")


def _build_with(tmp_path: Path, *extra: str, flags: tuple[str, ...] | None = None) -> native.NativeKernels:
    import ctypes

    target = tmp_path / "kernels.so"
    native.compile_library("g++", (*(flags or native.build_flags()), *extra), target)
    return native.NativeKernels(ctypes.CDLL(str(target)), target)


@pytest.fixture(
    scope="module",
    params=[
        "native",
        pytest.param("avx2", marks=ALSO_AVX2),
    ],
)
def kernels(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> native.NativeKernels:
    """This CPU's kernels; on an AVX-512 CPU also its AVX2 build, which must give the same results."""
    if request.param == "avx2":
        built = _build_with(tmp_path_factory.mktemp("avx2"), flags=native.AVX2_FLAGS)
        assert built.vector_bits == 256 and not built.amx
        return built
    loaded = native.load()
    if loaded is None:
        pytest.skip("the native kernels need an AVX2 CPU and a C++ compiler")
    return loaded


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 CPU or no g++ here")
def test_kernels_build_where_the_cpu_and_a_compiler_allow() -> None:
    built = native.load()
    assert built is not None
    assert built.path.is_file()


def _bf16(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(torch.bfloat16)


HAS_AMX = {"amx_tile", "amx_bf16"} <= cpu_flags()


@pytest.fixture(
    params=["avx512", pytest.param("amx", marks=pytest.mark.skipif(not HAS_AMX, reason="no AMX"))]
)
def products(request: pytest.FixtureRequest, kernels: native.NativeKernels) -> Iterator[native.NativeKernels]:
    """The kernels with their products on AVX-512 dot products, then (where the CPU has them) on AMX."""
    if request.param == "amx" and kernels.vector_bits != 512:
        pytest.skip("the AVX2 build has no AMX")
    before = kernels.amx, kernels.amx_int8
    kernels.amx = request.param == "amx"
    kernels.amx_int8 = kernels.amx and "amx_int8" in cpu_flags()
    yield kernels
    kernels.amx, kernels.amx_int8 = before


@pytest.fixture
def amx(kernels: native.NativeKernels) -> native.NativeKernels:
    """The kernels of a build that has AMX: the CPU's own, where the CPU has it (the AVX2 build built
    beside it has none)."""
    if not HAS_AMX:
        pytest.skip("no AMX")
    if kernels.vector_bits != 512:
        pytest.skip("the AVX2 build has no AMX")
    return kernels


def test_amx_is_used_where_the_cpu_has_it(kernels: native.NativeKernels) -> None:
    assert kernels.amx == (HAS_AMX and kernels.vector_bits == 512)


# rows: whole groups of 8 (AVX-512) or 16 (AMX tiles), remainders, both; K: whole 32-wide tile columns
# and K = 48, which AMX leaves to the AVX-512 loop
@pytest.mark.parametrize(
    ("rows", "cols"), [(1, 64), (2, 64), (3, 64), (8, 64), (9, 64), (19, 64), (35, 96), (3, 48)]
)
def test_linear_equals_the_fp32_product_to_bf16_rounding(
    products: native.NativeKernels, rows: int, cols: int
) -> None:
    kernels = products
    g = torch.Generator().manual_seed(rows)
    weight, x, residual = (
        _bf16(96, cols, generator=g),
        _bf16(rows, 1, cols, generator=g),
        _bf16(rows, 1, 96, generator=g),
    )
    packed = kernels.pack(weight)
    exact = x.float() @ weight.float().T
    for got, want in (
        (kernels.linear(x, packed), exact),
        (kernels.linear(x, packed, residual), exact + residual.float()),
    ):
        assert got.shape == (rows, 1, 96) and got.dtype == torch.bfloat16
        # one bf16 rounding of the fp32 sum: half a unit in the last place (2^-8 relative)
        assert torch.all((got.float() - want).abs() <= want.abs() * 2**-8 + 1e-6)


def test_linear_with_gelu_equals_torchs_exact_gelu(products: native.NativeKernels) -> None:
    kernels = products
    g = torch.Generator().manual_seed(7)
    weight, x, residual = (
        _bf16(64, 64, generator=g),
        _bf16(3, 1, 64, generator=g),
        _bf16(3, 1, 64, generator=g),
    )
    want = torch.nn.functional.gelu(x.float() @ weight.float().T) + residual.float()
    got = kernels.linear(x, kernels.pack(weight), residual, gelu=True).float()
    assert torch.all((got - want).abs() <= want.abs() * 2**-8 + 1e-5)


def test_pack_refuses_shapes_outside_the_panels(kernels: native.NativeKernels) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        kernels.pack(torch.zeros(40, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out"):
        kernels.pack(torch.zeros(32, 64, dtype=torch.bfloat16), out=torch.empty(32, 32, dtype=torch.bfloat16))


# K / 2 pairs: whole blocks of 16 (one transposition each), a block and a tail, a tail alone
@pytest.mark.parametrize(("rows", "cols"), [(64, 1024), (32, 96), (96, 6)])
def test_pack_lays_out_each_panel_as_its_k_pairs_of_32_columns(
    kernels: native.NativeKernels, rows: int, cols: int
) -> None:
    bits = torch.arange(rows * cols, dtype=torch.int32).to(torch.int16)  # every value its own bit pattern
    weight = bits.view(rows, cols).view(torch.bfloat16)
    # [N/32][K/2][32][2]: panel b, pair kk, column c holds W[32b + c, 2kk], W[32b + c, 2kk + 1]
    want = weight.view(torch.int16).view(rows // 32, 32, cols // 2, 2).transpose(1, 2).reshape(rows, cols)
    out = torch.full((rows, cols), -1, dtype=torch.int16).view(torch.bfloat16)
    assert kernels.pack(weight, out=out) is out
    assert torch.equal(out.view(torch.int16), want)
    assert torch.equal(kernels.pack(weight).view(torch.int16), want)


# positions: masked tails of 16 lanes and full ones; rows: fewer than the threads, or not a multiple of
# them (a row's heads are then shared out), and whole rows per thread
# --- int8 weights: u8 activations (a zero point a row) against s8 weights, summed exactly in int32 ---


@pytest.fixture
def int8_products(products: native.NativeKernels) -> native.NativeKernels:
    if not products.int8:
        pytest.skip("int8 products need AVX-512 VNNI")
    return products


def _int8_weight(rows: int, cols: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ints = torch.randint(-127, 128, (rows, cols), generator=generator, dtype=torch.int8)
    scales = torch.rand(rows, generator=generator) * 1e-2 + 1e-3
    return ints, scales


# rows: groups of 8 (VNNI) and 16 (AMX tiles) with remainders; K: one and several 64-wide tile columns
@pytest.mark.parametrize(("rows", "cols"), [(1, 64), (2, 128), (8, 64), (9, 192), (16, 64), (17, 128)])
def test_int8_linear_on_activations_its_grid_holds_is_exact_to_one_rounding(
    int8_products: native.NativeKernels, rows: int, cols: int
) -> None:
    kernels = int8_products
    g = torch.Generator().manual_seed(rows * cols)
    ints, scales = _int8_weight(96, cols, g)
    # integers from -100 to 155 with both ends present: the row's grid is exactly the integers (scale 1,
    # zero point 100), so the only roundings are the fp32 scale product and bf16
    x = torch.randint(-100, 156, (rows, 1, cols), generator=g).float()
    x[:, 0, 0], x[:, 0, 1] = -100, 155
    got = kernels.linear(x.to(torch.bfloat16), kernels.pack_int8(ints, scales))
    sums = x.double() @ ints.double().T  # exact
    want = (sums.float() * scales).to(torch.bfloat16)
    assert got.shape == (rows, 1, 96) and got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_int8_linear_stays_within_its_quantization_bound_with_gelu_and_residual(
    int8_products: native.NativeKernels,
) -> None:
    kernels = int8_products
    g = torch.Generator().manual_seed(3)
    ints, scales = _int8_weight(64, 256, g)
    x, residual = _bf16(5, 256, generator=g), _bf16(5, 64, generator=g)
    weight = ints.float() * scales[:, None]
    packed = kernels.pack_int8(ints, scales)
    # each activation is off its grid point by at most half a step, the step the row's range over 255
    lo, hi = x.float().amin(1).clamp(max=0), x.float().amax(1).clamp(min=0)
    bound = (hi - lo)[:, None] / 255 / 2 * weight.abs().sum(1)
    exact = x.float() @ weight.T
    want = exact + residual.float()
    got = kernels.linear(x, packed, residual).float()
    assert torch.all((got - want).abs() <= bound + want.abs() * 2**-8)
    gelu = kernels.linear(x, packed, gelu=True).float()
    # GELU moves a sum by at most 1.13x its own change
    assert torch.all((gelu - F.gelu(exact)).abs() <= 1.13 * bound + F.gelu(exact).abs() * 2**-8 + 1e-6)


def test_int8_linear_gives_nan_for_a_row_holding_nan_and_zero_for_a_row_of_zeros(
    int8_products: native.NativeKernels,
) -> None:
    kernels = int8_products
    g = torch.Generator().manual_seed(4)
    packed = kernels.pack_int8(*_int8_weight(32, 64, g))
    x = _bf16(3, 64, generator=g)
    x[0, 5], x[1] = float("nan"), 0.0
    x[2, 7] = float("inf")
    got = kernels.linear(x, packed)
    assert got[0].isnan().all() and got[2].isnan().all()
    assert torch.equal(got[1], torch.zeros(32, dtype=torch.bfloat16))


def test_pack_int8_refuses_widths_outside_its_tiles(kernels: native.NativeKernels) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        kernels.pack_int8(torch.zeros(32, 96, dtype=torch.int8), torch.ones(32))
    with pytest.raises(ValueError, match="does not fit"):
        kernels.pack_int8(torch.zeros(48, 64, dtype=torch.int8), torch.ones(48))


@pytest.mark.parametrize(("position", "rows"), [(0, 3), (1, 1), (15, 2), (16, 3), (17, 1), (70, 3), (70, 4)])
def test_attention_writes_the_new_key_and_attends_over_the_filled_positions(
    kernels: native.NativeKernels, position: int, rows: int
) -> None:
    g = torch.Generator().manual_seed(position)
    heads, dim, capacity = 4, 64, 80
    qkv = _bf16(rows, 1, 3 * heads * dim, generator=g) * 2  # peaked: a wrong position shows
    keys, values = (
        _bf16(rows, capacity, heads * dim, generator=g),
        _bf16(rows, capacity, heads * dim, generator=g),
    )
    after = keys[:, position + 1 :].clone(), values[:, position + 1 :].clone()
    out = kernels.attend(qkv, keys, values, heads, position)

    q, k, v = qkv.view(rows, 3, heads * dim).unbind(1)
    assert torch.equal(keys[:, position], k) and torch.equal(values[:, position], v)
    assert torch.equal(keys[:, position + 1 :], after[0]) and torch.equal(values[:, position + 1 :], after[1])
    seen_k = keys[:, : position + 1].view(rows, position + 1, heads, dim).float()
    seen_v = values[:, : position + 1].view(rows, position + 1, heads, dim).float()
    weights = torch.einsum("rhd,rphd->rhp", q.view(rows, heads, dim).float(), seen_k).softmax(-1)
    want = torch.einsum("rhp,rphd->rhd", weights, seen_v).reshape(rows, heads * dim)
    assert torch.allclose(out.float(), want, atol=2e-2, rtol=2**-7)


@pytest.mark.parametrize(("threads", "rows", "heads"), [(1, 2, 3), (3, 1, 5), (3, 2, 4), (3, 4, 3)])
def test_attention_shares_heads_out_unevenly_and_still_attends_right(
    kernels: native.NativeKernels, threads: int, rows: int, heads: int
) -> None:
    g = torch.Generator().manual_seed(threads * 10 + rows)
    dim, capacity, position = 32, 40, 33
    qkv = _bf16(rows, 1, 3 * heads * dim, generator=g) * 2
    keys, values = (
        _bf16(rows, capacity, heads * dim, generator=g),
        _bf16(rows, capacity, heads * dim, generator=g),
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # 3 threads over 4 heads: groups of 1, 1 and 2
    try:
        out = kernels.attend(qkv, keys, values, heads, position)
    finally:
        torch.set_num_threads(before)
    q = qkv.view(rows, 3, heads, dim)[:, 0].float()
    seen_k = keys[:, : position + 1].view(rows, -1, heads, dim).float()
    seen_v = values[:, : position + 1].view(rows, -1, heads, dim).float()
    weights = torch.einsum("rhd,rphd->rhp", q, seen_k).softmax(-1)
    want = torch.einsum("rhp,rphd->rhd", weights, seen_v).reshape(rows, heads * dim)
    assert torch.allclose(out.float(), want, atol=2e-2, rtol=2**-7)


def test_self_attention_with_a_nan_key_is_nan_for_that_head_alone(kernels: native.NativeKernels) -> None:
    g = torch.Generator().manual_seed(9)
    rows, heads, dim, capacity = 2, 4, 32, 20
    qkv = _bf16(rows, 1, 3 * heads * dim, generator=g)
    keys, values = (
        _bf16(rows, capacity, heads * dim, generator=g),
        _bf16(rows, capacity, heads * dim, generator=g),
    )
    keys[1, 3, 2 * dim + 5] = float("nan")  # row 1, position 3, head 2
    out = kernels.attend(qkv, keys, values, heads, 10).float().view(rows, heads, dim)
    assert out[1, 2].isnan().all()
    out[1, 2] = 0
    assert not out.isnan().any()


@pytest.fixture
def int8_attention(kernels: native.NativeKernels) -> native.NativeKernels:
    if not kernels.int8:
        pytest.skip("int8 attention needs VNNI")
    return kernels


def _on_grid(*shape: int, step: float, generator: torch.Generator) -> torch.Tensor:
    """bf16 values that int8 holds exactly: integers within +-127 times ``step``, every head's (last
    dimension's) largest magnitude exactly 127, so its scale is ``step``."""
    ints = torch.randint(-126, 127, shape, generator=generator)
    ints[..., 0] = 127
    return (ints * step).to(torch.bfloat16)


def _value_bits(cache: torch.Tensor, heads: int) -> torch.Tensor:
    """An int8 value cache's bytes, position-major ``(rows, capacity, hidden + 4 * heads)``."""
    ints, scales = native.int8_values(cache, heads)
    return torch.cat([ints, scales.view(torch.int8)], -1)


def _dequantized(cache: torch.Tensor, heads: int, offset: bool) -> torch.Tensor:
    """An int8 cache ``(rows, capacity, hidden + 4 * heads)`` as fp64 ``(rows, capacity, heads, D)``: keys
    (``offset``) a position at a time, values four positions together (``native.int8_values``)."""
    rows, positions, width = cache.shape
    hidden = width - 4 * heads
    if offset:
        ints = cache[..., :hidden].view(torch.uint8).double() - 128
        scales = cache[..., hidden:].contiguous().view(torch.float32).double()
    else:
        ints, scales = (t.double() for t in native.int8_values(cache, heads))
    return ints.view(rows, positions, heads, -1) * scales[..., None]


@pytest.mark.parametrize(
    ("position", "rows", "dim"), [(0, 1, 64), (1, 2, 32), (16, 3, 64), (17, 1, 96), (70, 4, 64), (40, 2, 256)]
)
def test_int8_attention_on_values_its_grid_holds_equals_exact_attention_to_bf16_rounding(
    int8_attention: native.NativeKernels, position: int, rows: int, dim: int
) -> None:
    """Keys, values and queries that int8 holds exactly: the scores are exact integer sums, so the
    output is exact attention but for fp32 softmax, the weights taken as two 8-bit digits (a weight, a
    softmax term times its value's scale, within 2^-17 of the largest), and the final bf16 rounding."""
    g = torch.Generator().manual_seed(position * 7 + dim)
    heads, capacity = 3, 80
    prefix_k = _on_grid(rows, position, heads, dim, step=2**-4, generator=g).view(rows, position, heads * dim)
    prefix_v = _on_grid(rows, position, heads, dim, step=2**-5, generator=g).view(rows, position, heads * dim)
    q = _on_grid(rows, 1, heads, dim, step=2**-8, generator=g)
    k = _on_grid(rows, 1, heads, dim, step=2**-4, generator=g)
    v = _on_grid(rows, 1, heads, dim, step=2**-5, generator=g)
    qkv = torch.cat([t.view(rows, 1, -1) for t in (q, k, v)], -1)
    keys, values = int8_attention.int8_caches(prefix_k, prefix_v, heads, capacity)
    after = keys[:, position + 1 :].clone(), _value_bits(values, heads)[:, position + 1 :]
    out = int8_attention.attend(qkv, keys, values, heads, position)

    seen_k = _dequantized(keys, heads, offset=True)[:, : position + 1]
    seen_v = _dequantized(values, heads, offset=False)[:, : position + 1]
    assert torch.equal(seen_k[:, :position], prefix_k.view(rows, position, heads, dim).double())
    assert torch.equal(seen_k[:, position], k[:, 0].double()) and torch.equal(
        seen_v[:, position], v[:, 0].double()
    )
    assert torch.equal(keys[:, position + 1 :], after[0])
    assert torch.equal(_value_bits(values, heads)[:, position + 1 :], after[1])
    weights = torch.einsum("rhd,rphd->rhp", q[:, 0].double(), seen_k).softmax(-1)
    want = torch.einsum("rhp,rphd->rhd", weights, seen_v).reshape(rows, heads * dim)
    ints, scales = (t[:, : position + 1].double() for t in native.int8_values(values, heads))
    largest = scales.amax(1)[..., None]  # (rows, heads, 1): no weight exceeds its largest value scale
    digits = (ints.view(rows, -1, heads, dim).abs().sum(1) * largest * 2**-17).reshape(rows, heads * dim)
    assert ((out.double() - want).abs() <= want.abs() * 2**-8 + digits + 1e-5).all()


@pytest.mark.parametrize(("threads", "rows", "heads"), [(1, 2, 16), (3, 1, 5), (2, 4, 16)])
def test_int8_attention_stays_within_its_quantization_error_of_bf16_attention(
    int8_attention: native.NativeKernels, threads: int, rows: int, heads: int
) -> None:
    g = torch.Generator().manual_seed(threads + rows)
    dim, capacity, position = 64, 130, 125
    qkv = torch.randn(rows, 1, 3 * heads * dim, generator=g)
    qkv[..., : heads * dim] /= dim**0.5  # the queries come scaled, as the model's do
    qkv = qkv.to(torch.bfloat16)
    keys, values = (
        _bf16(rows, capacity, heads * dim, generator=g),
        _bf16(rows, capacity, heads * dim, generator=g),
    )
    k8, v8 = int8_attention.int8_caches(
        keys[:, :position].contiguous(), values[:, :position].contiguous(), heads, capacity
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        exact = int8_attention.attend(qkv, keys, values, heads, position).double()
        got = int8_attention.attend(qkv, k8, v8, heads, position).double()
    finally:
        torch.set_num_threads(before)
    # Each head's ints are within half a step of its values (1/254 of its largest): about 1% of a head's
    # output on random values, at most twice that.
    error = (got - exact).view(rows, heads, dim).norm(dim=-1) / exact.view(rows, heads, dim).norm(dim=-1)
    assert error.mean() < 0.013 and error.max() < 0.025, error


def test_int8_caches_hold_each_head_within_half_a_step() -> None:
    kernels = native.load()
    if kernels is None or not kernels.int8:
        pytest.skip("int8 attention needs the kernels and VNNI")
    g = torch.Generator().manual_seed(3)
    heads, dim = 4, 32
    keys = _bf16(2, 9, heads * dim, generator=g) * torch.logspace(-3, 3, 9)[None, :, None].to(torch.bfloat16)
    keys[1, 4, dim : 2 * dim] = 0  # a head of zeros: scale 0, ints 0
    k8, v8 = kernels.int8_caches(keys, keys, heads, 12)
    for cache, offset in ((k8, True), (v8, False)):
        held = _dequantized(cache, heads, offset)[:, :9]
        source = keys.view(2, 9, heads, dim).double()
        step = source.abs().amax(-1, keepdim=True) / 127
        assert ((held - source).abs() <= step / 2 * (1 + 1e-6)).all()
        assert torch.equal(held[1, 4, 1], torch.zeros(dim, dtype=torch.float64))


_HUGE_PAGES_PROBE = """
import sys
import torch
from generation import native
from generation.fast_decoder import int8_pack_all

def huge() -> int:
    with open("/proc/self/smaps_rollup") as smaps:
        return next(int(line.split()[1]) * 1024 for line in smaps if line.startswith("AnonHugePages:"))

if sys.argv[1] == "caches":
    quantized = None
    before = huge()
    buffer = native.huge_page_buffer((2, 4, 8, 1000, 1088), torch.int8)  # 70 MB: four layers of int8 caches
    buffer.fill_(1)  # the pages come at first touch, as the step writes positions
    assert buffer.shape == (2, 4, 8, 1000, 1088) and buffer.dtype == torch.int8
elif sys.argv[1] == "bf16":  # the bf16 step weights of two layers of the small model's shape, packed,
    # then asked for 2 MB pages
    from types import SimpleNamespace as Layer
    from generation.fast_decoder import _Matrices, native_pack_all

    def linear(rows, cols):
        return Layer(weight=torch.randn(rows, cols).to(torch.bfloat16))

    def attention():
        return Layer(q_proj=linear(1024, 1024), k_proj=linear(1024, 1024), v_proj=linear(1024, 1024),
                     out_proj=linear(1024, 1024))

    layers = [Layer(self_attn=attention(), fc1=linear(4096, 1024), fc2=linear(1024, 4096)) for _ in range(2)]
    matrices = _Matrices([linear(2048, 1024)], layers, 0.125)
    packed = native_pack_all(matrices, native.load())
    assert torch.equal(packed["1.fc2"], native.load().pack(layers[1].fc2.weight))
    # packed on 4 kB pages, then asked for 2 MB ones, which khugepaged gathers later: the mapping is
    # marked for them ("hg" in its VmFlags)
    address, flags, inside = packed["0.fc1"].data_ptr(), {}, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                flags = set(line.split()[1:])
    print(int("hg" in flags) * 2**30)
    sys.exit(0)
else:  # the int8 step weights of two layers of the small model's shape, packed as a load packs them
    g = torch.Generator().manual_seed(0)
    quantized = {
        f"{layer}.{name}": {"ints": torch.randint(-127, 128, shape, dtype=torch.int8, generator=g),
                            "scales": torch.rand(shape[0], generator=g)}
        for layer in range(2)
        for name, shape in (("qkv", (3072, 1024)), ("fc1", (4096, 1024)), ("fc2", (1024, 4096)))
    }
    before = huge()
    packed = int8_pack_all(quantized, native.load())
    for name, parts in quantized.items():  # each as packing it alone makes it
        assert torch.equal(packed[name], native.load().pack_int8(**parts)), name
print(huge() - before)
"""


@pytest.mark.parametrize("what", ["caches", "weights", "bf16"])
def test_attention_caches_and_step_weights_sit_on_huge_pages_where_linux_lends_them(what: str) -> None:
    """In a fresh process, where the buffer is fresh memory (a long-lived worker may get its caches from
    memory glibc kept, already paged in, which is as good)."""
    import subprocess
    import sys

    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        pytest.skip("no transparent huge pages here")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are off here")
    if what == "weights" and (native.load() is None or not native.load().int8):
        pytest.skip("no native int8 products on this CPU")
    if what == "bf16" and native.load() is None:
        pytest.skip("no native kernels here")
    probe = subprocess.run(
        [sys.executable, "-c", _HUGE_PAGES_PROBE, what],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert (
        int(probe.stdout.split()[-1]) >= 2 * 2**20
    )  # at least one 2 MB page (nearly all where memory allows)


def test_int8_attention_with_a_nan_key_is_nan_for_that_head_alone(
    int8_attention: native.NativeKernels,
) -> None:
    g = torch.Generator().manual_seed(9)
    rows, heads, dim, capacity = 2, 4, 32, 20
    qkv = _bf16(rows, 1, 3 * heads * dim, generator=g)
    keys, values = _bf16(rows, 10, heads * dim, generator=g), _bf16(rows, 10, heads * dim, generator=g)
    keys[1, 3, 2 * dim + 5] = float("nan")  # row 1, position 3, head 2
    values[0, 7, dim] = float("inf")  # row 0, position 7, head 1
    k8, v8 = int8_attention.int8_caches(keys, values, heads, capacity)
    out = int8_attention.attend(qkv, k8, v8, heads, 10).float().view(rows, heads, dim)
    assert out[1, 2].isnan().all() and out[0, 1].isnan().all()
    out[1, 2] = out[0, 1] = 0
    assert not out.isnan().any()


def test_without_a_compiler_the_step_falls_back_to_torch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(native.shutil, "which", lambda _name: None)
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset(native.REQUIRED_CPU))
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    native.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="generation.native"):
            assert native.load() is None
        assert "no g++ found" in caplog.text
    finally:
        native.load.cache_clear()


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ here")
def test_a_failed_build_names_the_compiler_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", (broken,))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(OSError, match="error"):
        native._build(shutil.which("g++") or "g++", native.private_cache_dir())
    assert not list((tmp_path / "musicbot" / "kernels").iterdir())  # nothing half-written kept


@pytest.mark.parametrize("masked", [False, True])
def test_cross_attention_matches_softmax_attention_with_its_mask(
    kernels: native.NativeKernels, masked: bool
) -> None:
    g = torch.Generator().manual_seed(3)
    rows, heads, dim, text = 3, 2, 32, 19  # 3 rows: one is shared out between the two threads by heads
    q = _bf16(rows, 1, heads * dim, generator=g) * 2
    keys, values = _bf16(rows, text, heads * dim, generator=g), _bf16(rows, text, heads * dim, generator=g)
    mask = None
    if masked:  # padding after a short prompt, and an unconditional row that sees nothing
        mask = torch.zeros(rows, text)
        mask[1, 12:] = torch.finfo(torch.float32).min
        mask[2, :] = torch.finfo(torch.float32).min
    got = kernels.cross_attend(q, keys, values, mask, heads).float()

    scores = torch.einsum(
        "rhd,rphd->rhp", q.view(rows, heads, dim).float(), keys.view(rows, text, heads, dim).float()
    )
    if mask is not None:
        scores = scores + mask[:, None, :]
    want = torch.einsum("rhp,rphd->rhd", scores.softmax(-1), values.view(rows, text, heads, dim).float())
    assert torch.allclose(got, want.reshape(rows, heads * dim), atol=2e-2, rtol=2**-7)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_int8_cross_attention_reads_each_rows_prompt_alone_within_its_quantization_error(
    int8_attention: native.NativeKernels, threads: int
) -> None:
    """The text's int8 caches, each row over its own prompt: within the caches' quantization error of
    bf16 attention under the mask that hides the padding; the padding is never read (NaN there changes
    nothing), and a row is bit for bit what it is alone."""
    g = torch.Generator().manual_seed(threads)
    rows, heads, dim, text = 3, 16, 64, 23  # 23 positions: the caches hold whole quads, 24
    lengths = torch.tensor([23, 9, 1], dtype=torch.int32)
    q = (torch.randn(rows, 1, heads * dim, generator=g) / dim**0.5).to(torch.bfloat16)
    keys, values = _bf16(rows, text, heads * dim, generator=g), _bf16(rows, text, heads * dim, generator=g)
    mask = torch.zeros(rows, text)
    padded_keys, padded_values = keys.clone(), values.clone()
    for row, length in enumerate(lengths.tolist()):
        mask[row, length:] = torch.finfo(torch.float32).min
        padded_keys[row, length:] = padded_values[row, length:] = float("nan")
    k8, v8 = int8_attention.int8_caches(padded_keys, padded_values, heads, text)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        exact = int8_attention.cross_attend(q, keys, values, mask, heads).double()
        got = int8_attention.cross_attend_int8(q, k8, v8, lengths, heads)
        alone = int8_attention.cross_attend_int8(q[1:2], k8[1:2], v8[1:2], lengths[1:2], heads)
    finally:
        torch.set_num_threads(before)
    assert torch.isfinite(got).all()
    assert torch.equal(alone, got[1:2])
    exact = exact.view(rows, heads, dim)
    error = (got.double().view(rows, heads, dim) - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert error.mean() < 0.013 and error.max() < 0.025, error


def test_int8_cross_attention_refuses_lengths_outside_its_caches(
    int8_attention: native.NativeKernels,
) -> None:
    g = torch.Generator().manual_seed(0)
    heads, dim = 2, 32
    k8, v8 = int8_attention.int8_caches(
        _bf16(2, 5, heads * dim, generator=g), _bf16(2, 5, heads * dim, generator=g), heads, 5
    )  # 8 positions: whole quads
    q = _bf16(2, 1, heads * dim, generator=g)
    for lengths in ([0, 3], [3, 9], [2]):
        with pytest.raises(ValueError, match="lengths"):
            int8_attention.cross_attend_int8(q, k8, v8, torch.tensor(lengths, dtype=torch.int32), heads)
    with pytest.raises(ValueError, match="lengths"):
        int8_attention.cross_attend_int8(q, k8, v8, torch.tensor([1, 2]), heads)  # int64


def _text_step(
    kernels: native.NativeKernels,
    text: tuple[torch.Tensor, torch.Tensor],
    *,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    int8: bool = True,
    int8_text: bool | None = None,
) -> native.NativeStep:
    """A two-layer step of 2 rows (both conditional) over ``text`` (keys, values (2, n, 64) bf16), under
    ``mask`` or each row over its ``lengths``; with ``int8`` weights (and then by default, with lengths,
    the text as the int8 caches ``cross_attend_int8`` takes). Seeded weights."""
    from generation.fast_decoder import int8_quantize

    g = torch.Generator().manual_seed(5)
    hidden, heads, ffn, capacity = 64, 2, 128, 8

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)

    def pack(weight: torch.Tensor) -> torch.Tensor:
        return kernels.pack_int8(**int8_quantize(weight)) if int8 else kernels.pack(weight)

    keys, values = text
    if int8_text if int8_text is not None else int8 and lengths is not None:
        keys, values = kernels.int8_caches(keys, values, heads, keys.shape[1])
    ones, zeros = torch.ones(hidden, dtype=torch.bfloat16), torch.zeros(hidden, dtype=torch.bfloat16)
    layers = []
    for _ in range(2):
        self_keys, self_values = torch.zeros(2, capacity, hidden), torch.zeros(2, capacity, hidden)
        caches = (
            kernels.int8_caches(self_keys[:, :0].bfloat16(), self_values[:, :0].bfloat16(), heads, capacity)
            if int8
            else (self_keys.bfloat16(), self_values.bfloat16())
        )
        layers.append(
            {
                "ln1": (ones, zeros, 1e-5), "ln2": (ones, zeros, 1e-5), "ln3": (ones, zeros, 1e-5),
                "qkv": pack(w(3 * hidden, hidden)), "out": pack(w(hidden, hidden)),
                "cross_q": pack(w(hidden, hidden)), "cross_out": pack(w(hidden, hidden)),
                "fc1": pack(w(ffn, hidden)), "fc2": pack(w(hidden, ffn)),
                "keys": caches[0], "values": caches[1], "cross_keys": keys, "cross_values": values,
            }
        )  # fmt: skip
    return native.NativeStep(
        kernels,
        heads=heads,
        embeddings=[w(17, hidden) for _ in range(2)],
        positions=w(capacity, hidden),
        final_ln=(ones, zeros, 1e-5),
        lm_head=pack(w(2 * 16, hidden)),
        layers=layers,
        rows=2,
        cross_rows=2,
        cross_mask=mask,
        cross_lengths=lengths,
    )


def test_an_int8_step_reads_each_rows_prompt_from_the_texts_int8_caches(
    int8_attention: native.NativeKernels,
) -> None:
    """The whole int8 step with the text as int8 caches and each row's length: close to the same step
    over bf16 text under the padding mask, and the padding (NaN here) never read."""
    g = torch.Generator().manual_seed(1)
    keys, values = _bf16(2, 5, 64, generator=g), _bf16(2, 5, 64, generator=g)
    mask = torch.zeros(2, 5)
    mask[1, 2:] = torch.finfo(torch.float32).min
    masked = _text_step(int8_attention, (keys, values), mask=mask)
    keys, values = keys.clone(), values.clone()  # the masked step keeps reading its own
    keys[1, 2:] = values[1, 2:] = float("nan")
    lengths = torch.tensor([5, 2], dtype=torch.int32)
    by_length = _text_step(int8_attention, (keys, values), lengths=lengths)
    tokens = torch.tensor([[16, 16], [16, 16]])
    for position in range(4):
        want, got = masked(tokens, position).float(), by_length(tokens, position).float()
        assert torch.isfinite(got).all()
        assert (got - want).norm() <= 0.05 * want.norm(), position  # the text quantized to int8
        tokens = torch.tensor([[3, 7], [11, 2]]) if position == 0 else (tokens + 5) % 16


def test_a_bf16_step_over_each_rows_prompt_is_the_masked_step_bit_for_bit(
    kernels: native.NativeKernels,
) -> None:
    """bf16 text read to each row's length gives the very sums of the padding mask (the masked
    positions weigh exactly zero), without reading the padding (NaN there changes nothing)."""
    g = torch.Generator().manual_seed(3)
    keys, values = _bf16(2, 5, 64, generator=g), _bf16(2, 5, 64, generator=g)
    keys[1, 2:] = values[1, 2:] = 0.0  # the padding a prompt's projections leave: zero
    mask = torch.zeros(2, 5)
    mask[1, 2:] = torch.finfo(torch.float32).min
    masked = _text_step(kernels, (keys, values), mask=mask, int8=False)
    keys, values = keys.clone(), values.clone()
    keys[1, 2:] = values[1, 2:] = float("nan")
    by_length = _text_step(
        kernels, (keys, values), lengths=torch.tensor([5, 2], dtype=torch.int32), int8=False
    )
    tokens = torch.tensor([[16, 16], [16, 16]])
    for position in range(4):
        assert torch.equal(by_length(tokens, position), masked(tokens, position)), position
        tokens = torch.tensor([[3, 7], [11, 2]]) if position == 0 else (tokens + 5) % 16


def test_an_int8_text_step_refuses_lengths_it_cannot_take(int8_attention: native.NativeKernels) -> None:
    g = torch.Generator().manual_seed(2)
    text = _bf16(2, 5, 64, generator=g), _bf16(2, 5, 64, generator=g)
    for lengths in ([5, 0], [5, 9], [5]):
        with pytest.raises(ValueError, match="cross_lengths"):
            _text_step(int8_attention, text, lengths=torch.tensor(lengths, dtype=torch.int32))
    both = torch.tensor([5, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="cross_lengths"):  # a mask and lengths: one or the other
        _text_step(int8_attention, text, mask=torch.zeros(2, 8), lengths=both)
    with pytest.raises(ValueError, match=r"layer 0: torch.int8 \(2, 8, 72\)"):  # bf16 steps read bf16 text
        _text_step(int8_attention, text, lengths=both, int8=False, int8_text=True)


def test_native_engine_repeats_a_seed_bit_for_bit(
    kernels: native.NativeKernels, tiny_model_dir: Path
) -> None:
    from generation import GenerationRequest
    from generation.engine import load_engine

    engine = load_engine(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    request = GenerationRequest("upbeat electronic dance", duration=2.0, seed=99, variations=2)
    [a] = engine.generate([request])
    assert engine._fast_weights().linear.kind == "native"  # the kernels ran, not the fallback
    [b] = engine.generate([request])
    assert [t.samples for t in a.tracks] == [64000, 64000]
    for first, second in zip(a.tracks, b.tracks, strict=True):
        assert torch.equal(torch.from_numpy(first.audio), torch.from_numpy(second.audio))


def test_kernel_calls_refuse_tensors_they_would_read_out_of_bounds(kernels: native.NativeKernels) -> None:
    packed = kernels.pack(torch.zeros(32, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"x: torch\.float32"):
        kernels.linear(torch.zeros(2, 1, 64), packed)
    with pytest.raises(ValueError, match="x:"):
        kernels.linear(torch.zeros(2, 1, 62, dtype=torch.bfloat16), packed)
    with pytest.raises(ValueError, match="residual"):
        kernels.linear(
            torch.zeros(2, 1, 64, dtype=torch.bfloat16), packed, torch.zeros(1, 1, 32, dtype=torch.bfloat16)
        )
    keys = torch.zeros(1, 8, 64, dtype=torch.bfloat16)
    qkv = torch.zeros(1, 1, 3 * 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="keys"):
        kernels.attend(qkv, keys, keys.clone(), 2, 8)  # past the cache's 8 positions
    with pytest.raises(ValueError, match="keys"):
        kernels.attend(qkv, keys, keys.clone(), 4, 0)  # heads of 16: not in 32s
    with pytest.raises(ValueError, match="qkv"):
        kernels.attend(qkv[..., :96], keys, keys.clone(), 2, 0)


def test_cross_attention_with_a_nan_key_is_nan_for_that_head_alone(kernels: native.NativeKernels) -> None:
    g = torch.Generator().manual_seed(6)
    q = _bf16(2, 1, 64, generator=g)
    keys, values = _bf16(2, 5, 64, generator=g), _bf16(2, 5, 64, generator=g)
    keys[1, 0, 32 + 7] = float("nan")  # row 1, head 1, the first of 5 text positions
    out = kernels.cross_attend(q, keys, values, None, 2).float().view(2, 2, 32)
    assert out[1, 1].isnan().all()
    out[1, 1] = 0
    assert not out.isnan().any()


def test_attention_over_nothing_but_minus_infinity_is_nan_as_in_torch(kernels: native.NativeKernels) -> None:
    g = torch.Generator().manual_seed(5)
    q = _bf16(1, 1, 64, generator=g)
    keys, values = _bf16(1, 4, 64, generator=g), _bf16(1, 4, 64, generator=g)
    mask = torch.full((1, 4), float("-inf"))
    got = kernels.cross_attend(q, keys, values, mask, 2)
    want = torch.softmax(torch.zeros(4) + mask[0], -1)
    assert torch.isnan(want).all() and torch.isnan(got.float()).all()


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 CPU or no g++ here")
def test_a_cached_library_that_no_longer_loads_is_built_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = native._build(shutil.which("g++") or "g++", native.private_cache_dir())
    path.write_bytes(b"not a shared library")
    native.load.cache_clear()
    try:
        rebuilt = native.load()
        assert rebuilt is not None and rebuilt.path == path
        assert path.read_bytes()[:4] == b"\x7fELF"
    finally:
        native.load.cache_clear()


def _resnet_block(channels: int, seed: int) -> torch.nn.Module:
    """A residual block exactly as MusicGen's EnCodec builds it (weight-normed, no shortcut conv)."""
    from transformers import EncodecConfig
    from transformers.models.encodec.modeling_encodec import EncodecResnetBlock

    torch.manual_seed(seed)
    config = EncodecConfig(use_conv_shortcut=False, pad_mode="reflect", use_causal_conv=False)
    block = EncodecResnetBlock(config, channels, [1, 1]).eval()
    for conv in (block.block[1].conv, block.block[3].conv):
        torch.nn.init.normal_(conv.bias)
    return block


def _native_block(block: torch.nn.Module, kernels: native.NativeKernels) -> torch.nn.Module:
    from generation.codec import _NativeResnetBlock

    assert _NativeResnetBlock.fits(block, kernels)
    return _NativeResnetBlock(block, kernels)


# lengths: the shortest reflect padding allows, one tile of 64 and either side of it, several tiles;
# channels: 64 and 256 fit AMX's tiles (the products' fixture turns it on and off), 8 and 32 do not
@pytest.mark.parametrize(
    ("channels", "length"), [(8, 2), (8, 3), (32, 63), (64, 2), (64, 64), (64, 65), (64, 300), (256, 70)]
)
def test_residual_block_equals_encodecs_to_fp32_rounding(
    products: native.NativeKernels, channels: int, length: int
) -> None:
    from generation.codec import _NativeResnetBlock

    kernels = products
    block = _resnet_block(channels, seed=length)
    avx2 = kernels.vector_bits == 256
    if channels > _NativeResnetBlock.MAX_AVX2_CHANNELS and avx2 and not kernels.amx:  # left to oneDNN
        assert not _NativeResnetBlock.fits(block, kernels)
        return
    fused = _native_block(block, kernels)
    assert fused.amx == (kernels.amx and channels >= 64)
    x = torch.randn(3, channels, length, generator=torch.Generator().manual_seed(length))
    with torch.inference_mode():
        want, got = block(x), fused(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    # fp32 rounding; on AMX three bf16 products, about 2^-16 (measured: 4e-6 of the largest sample)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("channels", [16, 64])  # 64: on AMX where the CPU has it
def test_residual_block_keeps_nan_where_encodecs_has_it(
    products: native.NativeKernels, channels: int
) -> None:
    block = _resnet_block(channels, seed=1)
    x = torch.randn(2, channels, 200)
    x[1, 5, 100] = float("nan")
    with torch.inference_mode():
        want, got = block(x), _native_block(block, products)(x)
    assert torch.equal(got.isnan(), want.isnan())
    assert want.isnan().any()


def test_residual_block_call_refuses_what_it_would_read_out_of_bounds(kernels: native.NativeKernels) -> None:
    block = _resnet_block(16, seed=2)
    fused = _native_block(block, kernels)
    weights = (fused.w1, fused.b1, fused.w2, fused.b2)
    for bad in (
        torch.randn(1, 16, 1),  # too short to reflect
        torch.randn(1, 12, 50),  # other channels than the weights
        torch.randn(1, 16, 50).to(torch.bfloat16),
        torch.randn(1, 50, 16).transpose(1, 2),  # not contiguous
    ):
        with pytest.raises(ValueError, match="does not fit"):
            kernels.resblock(bad, *weights)
    # the module itself hands what the kernel cannot take back to EnCodec's own block
    short = torch.randn(1, 16, 1)
    with torch.inference_mode():
        assert torch.equal(fused(short), block(short))


def test_only_encodecs_plain_residual_blocks_up_to_512_channels_take_the_kernel(
    products: native.NativeKernels,
) -> None:
    from transformers import EncodecConfig
    from transformers.models.encodec.modeling_encodec import EncodecResnetBlock

    from generation.codec import _NativeResnetBlock

    kernels = products
    plain = EncodecConfig(use_conv_shortcut=False, pad_mode="reflect", use_causal_conv=False)
    assert _NativeResnetBlock.fits(EncodecResnetBlock(plain, 128, [1, 1]), kernels)
    # wider: the AVX-512 build and AMX's tiles outran oneDNN up to 512 channels, the AVX2 build did not
    wide = kernels.vector_bits == 512 or kernels.amx
    assert _NativeResnetBlock.fits(EncodecResnetBlock(plain, 256, [1, 1]), kernels) == wide
    assert _NativeResnetBlock.fits(EncodecResnetBlock(plain, 512, [1, 1]), kernels) == wide
    assert not _NativeResnetBlock.fits(EncodecResnetBlock(plain, 1024, [1, 1]), kernels)
    assert not _NativeResnetBlock.fits(EncodecResnetBlock(plain, 6, [1, 1]), kernels)  # hidden 3: not in 4s
    assert not _NativeResnetBlock.fits(EncodecResnetBlock(plain, 64, [2, 1]), kernels)  # dilated
    for other in (
        EncodecConfig(use_conv_shortcut=True, pad_mode="reflect", use_causal_conv=False),
        EncodecConfig(use_conv_shortcut=False, pad_mode="constant", use_causal_conv=False),
        EncodecConfig(use_conv_shortcut=False, pad_mode="reflect", use_causal_conv=True),
    ):
        assert not _NativeResnetBlock.fits(EncodecResnetBlock(other, 64, [1, 1]), kernels)


@pytest.mark.parametrize(
    ("stride", "length", "cin", "cout"), [(8, 63, 40, 33), (5, 66, 70, 16), (4, 130, 64, 20)]
)
def test_fp32_upsampling_equals_torchs_transposed_convolution_on_each_build(
    kernels: native.NativeKernels, stride: int, length: int, cin: int, cout: int
) -> None:
    """EnCodec's strides on this CPU's build and its AVX2 one: a partial block of 16 outputs, input
    channels in whole and partial chunks of 32, several tiles of q's (test_codec.py covers the rest)."""
    g = torch.Generator().manual_seed(stride * 100 + length)
    x = torch.randn(2, cin, length, generator=g)
    weight = torch.randn(cin, cout, 2 * stride, generator=g) / 8
    bias = torch.randn(cout, generator=g)
    left = stride - stride // 2  # EnCodec's split of the stride's padding
    for activate in (False, True):
        inner = torch.nn.functional.elu(x) if activate else x
        full = torch.nn.functional.conv_transpose1d(inner, weight, bias, stride=stride)
        want = full[..., left : full.shape[-1] - (stride - left)]
        got = kernels.upsample(x, kernels.pack_upsample(weight), bias, stride, left, activate=activate)
        assert got.shape == want.shape == (2, cout, stride * length)
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize(("stride", "length"), [(4, 1), (4, 63), (4, 64), (5, 30), (8, 7), (2, 100)])
def test_amx_upsampling_equals_torchs_transposed_convolution(
    amx: native.NativeKernels, stride: int, length: int
) -> None:
    kernels = amx
    g = torch.Generator().manual_seed(stride * 100 + length)
    x = torch.randn(2, 64, length, generator=g)
    weight = torch.randn(64, 32, 2 * stride, generator=g) / 8
    bias = torch.randn(32, generator=g)
    left = stride - stride // 2  # EnCodec's split of the stride's padding
    for activate in (False, True):
        inner = torch.nn.functional.elu(x) if activate else x
        full = torch.nn.functional.conv_transpose1d(inner, weight, bias, stride=stride)
        want = full[..., left : full.shape[-1] - (stride - left)]
        got = kernels.upsample_amx(
            x, kernels.pack_upsample_amx(weight), bias, stride, left, activate=activate
        )
        assert got.shape == want.shape == (2, 32, stride * length)
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_amx_convolutions_refuse_what_their_tiles_cannot_take(amx: native.NativeKernels) -> None:
    kernels = amx
    with pytest.raises(ValueError, match="do not fit"):
        kernels.pack_amx_conv(torch.zeros(3, 16, 16))  # inputs not in 32s
    with pytest.raises(ValueError, match="do not fit"):
        kernels.pack_amx_conv(torch.zeros(1, 24, 32))  # outputs not in 16s
    weights = kernels.pack_upsample_amx(torch.zeros(64, 32, 8))
    with pytest.raises(ValueError, match="does not fit"):
        kernels.upsample_amx(
            torch.zeros(1, 64, 5), weights, torch.zeros(32), 5, 3, activate=False
        )  # 4's taps
    kernels.amx = False
    try:
        with pytest.raises(ValueError, match="does not fit"):
            kernels.upsample_amx(torch.zeros(1, 64, 5), weights, torch.zeros(32), 4, 2, activate=False)
    finally:
        kernels.amx = True


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 CPU or no g++ here")
def test_the_kernels_build_and_run_for_a_cpu_without_amx(tmp_path: Path) -> None:
    # -march=native without AMX's extensions: what an AVX-512 BF16 CPU of an older generation gets
    kernels = _build_with(tmp_path, "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8")
    kernels.amx = False
    g = torch.Generator().manual_seed(0)
    weight, x = _bf16(64, 64, generator=g), _bf16(3, 1, 64, generator=g)
    got = kernels.linear(x, kernels.pack(weight)).float()
    want = x.float() @ weight.float().T
    assert torch.all((got - want).abs() <= want.abs() * 2**-8 + 1e-6)


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 CPU or no g++ here")
def test_a_compiler_without_amx_gives_entry_points_that_amx_enable_never_lets_run(tmp_path: Path) -> None:
    kernels = _build_with(tmp_path, "-DMUSICBOT_NO_AMX")
    assert not kernels.amx
    with pytest.raises(ValueError, match="does not fit"):  # and the calls that need AMX are refused
        kernels.upsample_amx(
            torch.zeros(1, 64, 4), (torch.zeros(8, 32, 64),) * 2, torch.zeros(32), 4, 2, activate=False
        )


def test_amx_residual_block_refuses_a_hidden_width_its_second_convolution_cannot_take(
    amx: native.NativeKernels,
) -> None:
    kernels = amx
    w1 = kernels.pack_amx_conv(
        torch.zeros(3, 48, 32)
    )  # 48 outputs fit (16s), but as inputs 48 does not (32s)
    w2 = (torch.zeros(1, 32, 48, dtype=torch.bfloat16),) * 2
    with pytest.raises(ValueError, match="does not fit"):
        kernels.resblock_amx(torch.zeros(1, 32, 10), w1, torch.zeros(48), w2, torch.zeros(32))


# --- the declared interface: each call checked at the one binding layer ---

HAS_GXX = shutil.which("g++") is not None and native.platform.machine() in ("x86_64", "AMD64")


@pytest.fixture(scope="module")
def bound(tmp_path_factory: pytest.TempPathFactory) -> native.NativeKernels:
    """The kernels for this CPU, or where it lacks the instructions a build for an AVX-512 BF16 CPU that
    is loaded but never run: the refusals below happen before any call crosses into the library."""
    if CAN_BUILD:
        built = native.load()
        assert built is not None
        return built
    if not HAS_GXX:
        pytest.skip("no g++ for x86-64 here")
    flags = tuple(f for f in native.FLAGS if f != "-march=native")
    return _build_with(tmp_path_factory.mktemp("kernels"), "-march=cooperlake", flags=flags)


def test_a_kernel_called_with_the_wrong_dtype_names_the_argument(bound: native.NativeKernels) -> None:
    packed, y = torch.zeros(32, 64, dtype=torch.bfloat16), torch.zeros(2, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^linear_bf16: x: torch\.float32 .* contiguous bf16"):
        bound.calls["linear_bf16"](packed, torch.zeros(2, 64), None, y, 2, 32, 64, 0, 1)
    with pytest.raises(ValueError, match=r"^linear_bf16: y: .* contiguous bf16"):
        bound.calls["linear_bf16"](
            packed, y.new_zeros(2, 64), None, torch.zeros(32, 2).bfloat16().t(), 2, 32, 64, 0, 1
        )


def test_a_kernel_called_with_a_tensor_smaller_than_its_sizes_names_the_argument(
    bound: native.NativeKernels,
) -> None:
    packed, y = torch.zeros(32, 64, dtype=torch.bfloat16), torch.zeros(2, 32, dtype=torch.bfloat16)
    short = torch.zeros(2, 62, dtype=torch.bfloat16)
    with pytest.raises(
        ValueError, match=r"^linear_bf16: x: \(2, 62\) holds 124 values, the call's M \* K is 128"
    ):
        bound.calls["linear_bf16"](packed, short, None, y, 2, 32, 64, 0, 1)
    with pytest.raises(ValueError, match=r"^linear_bf16: residual: "):
        bound.calls["linear_bf16"](packed, short.new_zeros(2, 64), y[:1], y, 2, 32, 64, 0, 1)
    with pytest.raises(ValueError, match=r"^resblock_f32: scratch: .* at least"):
        x = torch.zeros(1, 4, 8)
        bound.calls["resblock_f32"](
            x, torch.empty_like(x), torch.zeros(48), torch.zeros(4), torch.zeros(16), torch.zeros(4),
            torch.zeros(1), 1, 4, 4, 8, 1,
        )  # fmt: skip


def test_a_kernel_called_with_more_heads_than_it_holds_names_the_limit(bound: native.NativeKernels) -> None:
    heads, dim = native.MAX_HEADS + 1, 32
    hidden = heads * dim
    keys = torch.zeros(1, 2, hidden, dtype=torch.bfloat16)
    qkv, out = torch.zeros(1, 3 * hidden, dtype=torch.bfloat16), torch.zeros(1, hidden, dtype=torch.bfloat16)
    with pytest.raises(
        ValueError, match=rf"^attend_bf16: needs 0 < heads <= MAX_HEADS \(heads = {heads}, MAX"
    ):
        bound.calls["attend_bf16"](qkv, keys, keys.clone(), out, torch.zeros(10**6), 1, heads, dim, 2, 0, 1)
    with pytest.raises(ValueError, match="keys"):  # and the method refuses them before that
        bound.attend(qkv, keys, keys.clone(), heads, 0)


def test_a_step_call_refuses_a_position_past_its_caches_and_a_short_layer_array(
    bound: native.NativeKernels,
) -> None:
    import ctypes

    model = native.StepModel(layers=2, hidden=64, heads=2, ffn=64, codebooks=2, vocab=16, capacity=4)
    layers = (native.StepLayer * 1)()
    step = bound.calls["decoder_step"]
    tokens, x = torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 64, dtype=torch.bfloat16)
    logits, work = torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(10**4, dtype=torch.bfloat16)
    scratch = torch.zeros(10**4)
    with pytest.raises(ValueError, match=r"^decoder_step: layers: not an array of m\.layers = 2 StepLayer"):
        step(model, layers, tokens, x, logits, work, scratch, 1, 0, 0, 1)
    with pytest.raises(ValueError, match=r"^decoder_step: needs 0 <= position < m\.capacity"):
        step(model, (native.StepLayer * 2)(), tokens, x, logits, work, scratch, 1, 0, 4, 1)
    with pytest.raises(ValueError, match=r"^decoder_step: m: "):
        step(ctypes.c_int(3), layers, tokens, x, logits, work, scratch, 1, 0, 0, 1)


@pytest.mark.skipif(not HAS_GXX, reason="no g++ for x86-64 here")
def test_a_definition_that_disagrees_with_its_declaration_does_not_compile(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.cpp"  # K as a float: the generated header says int
    wrong.write_text(
        '#include "interface.h"\n'
        'extern "C" void pack_linear_weight(const uint16_t*, uint16_t*, int, float) {}\n'
    )
    with pytest.raises(OSError, match="conflicting declaration"):
        native.compile_library("g++", ("-shared", "-fPIC"), tmp_path / "wrong.so", (wrong,))


def test_the_header_declares_every_kernel_and_the_shared_constants() -> None:
    from generation import native_api

    header = native_api.render_header()
    assert f"#define MUSICBOT_MAX_HEADS {native.MAX_HEADS}" in header
    for kernel in native_api.KERNELS:
        assert kernel.declaration() in header
    assert "struct StepLayer {" in header and "struct StepModel {" in header


# --- the cache: loaded only from a directory and a file that this user alone can write ---


GXX = "/usr/bin/g++"


@pytest.fixture
def cpu_that_builds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A CPU the kernels are for and a compiler (as far as load() asks), the cache root in tmp_path."""
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset(native.REQUIRED_CPU))
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native.shutil, "which", lambda _name: GXX)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.load.cache_clear()
    yield tmp_path / "musicbot" / "kernels"
    native.load.cache_clear()


def _refused(caplog: pytest.LogCaptureFixture) -> str:
    with caplog.at_level(logging.WARNING, logger="generation.native"):
        assert native.load() is None
    return caplog.text


def test_a_cache_directory_others_can_write_is_refused_and_torch_runs(
    cpu_that_builds: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cpu_that_builds.mkdir(parents=True)
    cpu_that_builds.chmod(0o777)
    text = _refused(caplog)
    assert f"directory {cpu_that_builds} is writable by its group or others (mode 777)" in text
    assert "torch's kernels run instead" in text
    assert not list(cpu_that_builds.iterdir())  # nothing built into it


def test_the_cache_directory_is_created_private(cpu_that_builds: Path) -> None:
    assert native.private_cache_dir() == cpu_that_builds
    for directory in (cpu_that_builds, cpu_that_builds.parent):
        assert directory.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(not os.access(GXX, os.X_OK), reason=f"no {GXX} here")
def test_a_library_others_can_write_is_refused(
    cpu_that_builds: Path, caplog: pytest.LogCaptureFixture
) -> None:
    library = native.library_path(GXX, native.private_cache_dir())  # where load() looks for it
    library.write_bytes(b"\x7fELF planted")
    library.chmod(0o664)
    text = _refused(caplog)
    assert f"library {library} is writable by its group or others (mode 664)" in text


def test_a_cache_directory_of_another_user_is_refused(
    cpu_that_builds: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_that_builds.mkdir(parents=True, mode=0o700)
    give_to_another_user(cpu_that_builds, monkeypatch)
    text = _refused(caplog)
    assert "belongs to uid" in text and "not to this user" in text


# --- a sanitized build running every entry point ---


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 CPU or no g++ here")
@pytest.mark.parametrize("build", ["native", pytest.param("avx2", marks=ALSO_AVX2)])
def test_every_entry_point_runs_clean_under_address_and_undefined_behaviour_sanitizers(
    tmp_path: Path, build: str
) -> None:
    """On an AVX-512 CPU also the AVX2 build: AddressSanitizer does not see AVX-512's masked stores,
    but it does see the AVX2 build's lane-by-lane ones."""
    import subprocess
    import sys

    asan = subprocess.run(
        ["g++", "-print-file-name=libasan.so"], capture_output=True, text=True
    ).stdout.strip()
    if not os.path.isabs(asan):
        pytest.skip("this g++ has no AddressSanitizer runtime")
    target = tmp_path / "sanitized.so"
    flags = [f for f in (native.AVX2_FLAGS if build == "avx2" else native.build_flags()) if f != "-O3"]
    sanitize = (
        "-O1",
        "-g",
        "-fsanitize=address,undefined",
        "-fno-omit-frame-pointer",
        "-fno-sanitize-recover",
    )
    native.compile_library("g++", (*flags, *sanitize), target)
    env = {
        **os.environ,
        "LD_PRELOAD": asan,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",  # python itself leaks by design
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    run = subprocess.run(
        [sys.executable, "-m", "tests.generation.native_sanitized", str(target)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    report = run.stderr[-4000:]
    assert run.returncode == 0, report
    assert "AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr, report
    assert run.stdout.strip().endswith("ok")
