"""Tensor inputs in keys, and the opt-in normalizations that trade exactness for hit ratio."""

import math
import subprocess
import sys
import unicodedata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.keys import (
    RequestIdentity,
    canonical_bytes,
    normalize_text,
    quantize_tensor,
    result_key,
)

IDENTITY = RequestIdentity("ns", "tenant-a", "tensor-model", "1", "predict")
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INT_DTYPE_FOR = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def key(value: object) -> str:
    return result_key(IDENTITY, value, {})


def bits(tensor: torch.Tensor) -> list[int]:
    """The bit patterns of a floating tensor, so that -0.0, 0.0 and NaNs can be told apart."""
    return tensor.contiguous().view(INT_DTYPE_FOR[tensor.element_size()]).flatten().tolist()


# Tensors


def test_tensor_key_is_deterministic_and_follows_the_values():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert key(tensor) == key(tensor.clone())
    changed = tensor.clone()
    changed[2, 3] += 1
    assert key(changed) != key(tensor)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (torch.zeros(4, dtype=torch.float32), torch.zeros(4, dtype=torch.int32)),  # same bytes
        (torch.zeros(4, dtype=torch.float16), torch.zeros(4, dtype=torch.bfloat16)),
        (torch.ones(4, dtype=torch.uint8), torch.ones(4, dtype=torch.bool)),
        (torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(3, 2)),
        (torch.arange(6.0), torch.arange(6.0).reshape(1, 6)),
        (torch.tensor(1.0), torch.tensor([1.0])),
        (torch.zeros(0, 3), torch.zeros(3, 0)),
        (torch.tensor(0.0), torch.tensor(-0.0)),  # exact bytes: only quantize_tensor folds them
        (torch.tensor([1.0, 2.0]), [1.0, 2.0]),
        (torch.tensor([1, 2]), b"\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00"),
    ],
)
def test_dtype_shape_and_type_change_the_key(left, right):
    assert canonical_bytes(left) != canonical_bytes(right)
    assert key(left) != key(right)


def test_strides_do_not_change_the_key():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    for view in (base.t(), base[:, ::2], base[1:3], base.unsqueeze(0).expand(3, 4, 6)):
        assert not view.is_contiguous() or view.storage_offset() > 0
        assert canonical_bytes(view) == canonical_bytes(view.contiguous().clone())


def test_autograd_state_and_lazy_views_do_not_change_the_key():
    values = torch.randn(3, 3)
    assert key(values.clone().requires_grad_()) == key(values)
    assert key(torch.nn.Parameter(values.clone())) == key(values)
    assert key(torch._neg_view(values)) == key(-values)  # memory holds `values`, not `-values`
    complex_values = torch.randn(4, dtype=torch.complex64)
    assert key(complex_values.conj()) == key(complex_values.conj().resolve_conj())


def test_tensors_nest_inside_requests():
    image = torch.rand(3, 8, 8)
    request = {"image": image, "threshold": 0.5}
    assert key(request) == key({"threshold": 0.5, "image": image.clone()})
    assert key(request) != key({"image": image, "threshold": 0.25})


def test_tensors_without_dense_data_are_rejected():
    with pytest.raises(TypeError):
        canonical_bytes(torch.eye(3).to_sparse())
    with pytest.raises(TypeError):
        canonical_bytes(torch.empty(3, device="meta"))


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from([torch.float32, torch.float64, torch.int64, torch.int8, torch.bool]),
    st.lists(st.integers(0, 4), max_size=3),
    st.data(),
)
def test_only_equal_bytes_share_a_key(dtype, shape, data):
    numel = math.prod(shape)
    raw = data.draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    tensor = torch.tensor(list(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    if dtype == torch.bool:
        tensor = tensor.view(torch.uint8).bitwise_and(1).view(torch.bool)
    assert key(tensor) == key(tensor.clone())
    if numel:
        flipped = tensor.flatten().view(torch.uint8).clone()
        flipped[data.draw(st.integers(0, len(flipped) - 1))] ^= 1
        assert key(flipped.view(dtype).reshape(shape)) != key(tensor)


def test_tensor_key_is_the_same_in_another_process():
    code = (
        "import torch;"
        "from cluster.keys import RequestIdentity, result_key;"
        "t = torch.arange(24, dtype=torch.bfloat16).reshape(2, 3, 4).transpose(0, 2);"
        "print(result_key(RequestIdentity('ns','tenant-a','tensor-model','1','predict'),"
        "{'x': t, 'n': 3}, {}))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "4242"},
    ).stdout.strip()
    tensor = torch.arange(24, dtype=torch.bfloat16).reshape(2, 3, 4).transpose(0, 2)
    assert other == key({"x": tensor.contiguous(), "n": 3})


# Text normalization


def test_composed_and_decomposed_forms_share_a_key_after_normalizing():
    composed = "caf\u00e9 na\u00efve \u1e9b\u0323"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert key(composed) != key(decomposed)  # exact by default
    assert key(normalize_text(composed)) == key(normalize_text(decomposed))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  hello \t\n  world  ", "hello world"),
        ("a\u00a0\u2003b\r\nc", "a b c"),  # non-breaking and em spaces are whitespace too
        ("", ""),
        (" \n\t ", ""),
        ("one", "one"),
        ("zero\u200bwidth", "zero\u200bwidth"),  # not whitespace: kept
    ],
)
def test_whitespace_runs_collapse_to_one_space(text, expected):
    assert normalize_text(text) == expected


@given(st.text())
def test_normalize_text_is_idempotent_and_nfc(text):
    normalized = normalize_text(text)
    assert normalize_text(normalized) == normalized
    assert unicodedata.is_normalized("NFC", normalized)
    assert normalized == normalized.strip()
    assert "  " not in normalized
    assert all(char == " " or not char.isspace() for char in normalized)


@given(st.text(), st.lists(st.sampled_from([" ", "\t", "\n", "\u3000"]), min_size=1, max_size=4))
def test_extra_whitespace_shares_a_key(text, spaces):
    padded = "".join(spaces) + text.replace(" ", "".join(spaces)) + "".join(spaces)
    assert key(normalize_text(padded)) == key(normalize_text(text))


# Tensor quantization

finite_floats = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
steps = st.sampled_from([0.5, 0.1, 0.01, 1e-3, 2.0, 0.25])


@given(st.lists(finite_floats, min_size=1, max_size=16), steps)
def test_quantized_values_are_near_multiples_of_step(values, step):
    tensor = torch.tensor(values, dtype=torch.float64)
    quantized = quantize_tensor(tensor, step)
    assert quantized.dtype == tensor.dtype and quantized.shape == tensor.shape
    multiples = quantized / step
    assert torch.allclose(multiples, multiples.round(), rtol=0, atol=1e-6)
    assert bool(((quantized - tensor).abs() <= step / 2 * (1 + 1e-9)).all())


@given(st.lists(finite_floats, min_size=1, max_size=16), steps, st.sampled_from(FLOAT_DTYPES))
def test_quantize_is_idempotent(values, step, dtype):
    quantized = quantize_tensor(torch.tensor(values).to(dtype), step)
    assert bits(quantize_tensor(quantized, step)) == bits(quantized)


@given(finite_floats, steps, st.floats(-0.49, 0.49))
def test_values_in_one_bucket_share_a_key(center, step, offset):
    multiple = round(center / step) * step
    nearby = torch.tensor([multiple + offset * step], dtype=torch.float64)
    exact = torch.tensor([multiple], dtype=torch.float64)
    assert key(quantize_tensor(nearby, step)) == key(quantize_tensor(exact, step))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_negative_zero_and_nans_are_canonical(dtype):
    nan_payloads = torch.tensor([0x7FC00001, -0x00400000, 0x7F800001], dtype=torch.int32)
    nans = nan_payloads.view(torch.float32).to(torch.float64).to(dtype)
    assert bool(nans.isnan().all())
    tensor = torch.cat([nans, torch.tensor([-0.0, -1e-9, 0.0, math.inf, -math.inf]).to(dtype)])
    quantized = quantize_tensor(tensor, 0.5)
    zero, nan = bits(torch.zeros(1, dtype=dtype))[0], bits(quantized[:1])[0]
    assert bits(quantized) == [nan] * 3 + [zero] * 3 + bits(tensor[-2:])
    assert bits(quantize_tensor(torch.tensor([math.nan]).to(dtype), 0.1)) == [nan]
    assert key(quantize_tensor(nans, 0.5)) == key(quantize_tensor(nans.flip(0), 0.5))


def test_values_beyond_the_dtype_range_stay_finite():
    tensor = torch.tensor([65504.0, -65504.0, 1.0], dtype=torch.float16)
    assert quantize_tensor(tensor, 1000.0).tolist() == [65504.0, -65504.0, 0.0]
    huge = torch.tensor([1e308], dtype=torch.float64)
    assert quantize_tensor(huge, 1e-300).tolist() == [1e308]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool])
def test_non_floating_tensors_are_unchanged(dtype):
    tensor = torch.tensor([0, 1, 1, 0]).to(dtype)
    assert quantize_tensor(tensor, 0.5) is tensor


@pytest.mark.parametrize("step", [0.0, -1.0, math.inf, math.nan])
def test_step_must_be_positive_and_finite(step):
    with pytest.raises(ValueError):
        quantize_tensor(torch.zeros(2), step)


def test_quantize_does_not_modify_its_input():
    tensor = torch.tensor([0.26, -0.0, math.nan])
    before = bits(tensor)
    quantize_tensor(tensor, 0.1)
    assert bits(tensor) == before
