"""The fast paths against the plain formulations: bucketed relative positions, attention through
``F.scaled_dot_product_attention`` (the ``fused`` path), sliced linear layers."""
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'bench'))
from reference import direct_rpe  # noqa: E402
from fixtures import norm_relative_error  # noqa: E402
import layers  # noqa: E402
from layers import Attention, SlicedLinear, official_qkv_slice, qkv_rows  # noqa: E402


@pytest.fixture(params=['explicit', 'fused'])
def attention_path(request, monkeypatch):
    """Each test below once per attention path: the explicit matmuls and SDPA (CUDA's default) on the CPU."""
    monkeypatch.setattr(layers, 'SDPA_DEVICES', {'cpu'} if request.param == 'fused' else set())
    return request.param


@pytest.mark.parametrize('tokens, length', [(197, 14), (17, 2), (65, 14), (50, 4)])
def test_attention_matches_the_direct_formulation_forward_and_gradients(tokens, length, attention_path):
    torch.manual_seed(tokens)
    attention = Attention(192, 3, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0., rpe=True,
                          rpe_length=length).double()
    for table in (attention.rel_pos_embed_k, attention.rel_pos_embed_v):  # training-scale tables, not init's
        torch.nn.init.normal_(table.embeddings_table_v)
        torch.nn.init.normal_(table.embeddings_table_h)
    x = torch.randn(2, tokens, 192, dtype=torch.double)

    def run():
        attention.zero_grad()
        inputs = x.clone().requires_grad_()
        out = attention(inputs)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        return [out, inputs.grad] + [p.grad.clone() for p in attention.parameters()]

    ours = run()
    with direct_rpe():
        reference = run()
    names = ['output', 'input grad'] + [name for name, _ in attention.named_parameters()]
    errors = {name: norm_relative_error(a, b) for name, a, b in zip(names, ours, reference)}
    assert max(errors.values()) < 1e-10, errors  # float64: any error above rounding is a bug


def test_attention_in_float32_stays_within_1e_5_of_the_direct_formulation(attention_path):
    torch.manual_seed(0)
    attention = Attention(240, 4, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0., rpe=True, rpe_length=14)
    x = torch.randn(4, 197, 240)
    ours = attention(x)
    with direct_rpe():
        reference = attention(x)
    assert norm_relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize('rows', [5, 'qkv'])
def test_sliced_linear_equals_autograd_slicing_and_passes_gradcheck(rows):
    torch.manual_seed(0)
    weight = torch.randn(12, 7, dtype=torch.double, requires_grad=True)
    bias = torch.randn(12, dtype=torch.double, requires_grad=True)
    inputs = torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True)
    rows = qkv_rows(9, torch.device('cpu')) if rows == 'qkv' else rows
    out_features = len(rows) if isinstance(rows, torch.Tensor) else rows

    def plain(x, w, b):
        block = w[rows, :4] if isinstance(rows, torch.Tensor) else w[:rows, :4]
        return torch.nn.functional.linear(x, block, b[:out_features])

    grad = torch.randn(2, 3, out_features, dtype=torch.double)
    expected = torch.autograd.grad(plain(inputs, weight, bias), (inputs, weight, bias), grad)
    ours = torch.autograd.grad(SlicedLinear.apply(inputs, weight, bias, rows, 4), (inputs, weight, bias), grad)
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))
    assert torch.autograd.gradcheck(lambda x, w, b: SlicedLinear.apply(x, w, b, rows, 4), (inputs, weight, bias))
    if isinstance(rows, torch.Tensor):  # the official qkv layout, de-interleaved
        assert torch.equal(weight[rows, :4], official_qkv_slice(weight, bias, 4, 9)[0])


@pytest.mark.parametrize('rows', [5, 'qkv'])
def test_sliced_linear_under_bf16_autocast_matches_autograd_slicing(rows):
    torch.manual_seed(0)
    weight, bias = torch.randn(12, 7, requires_grad=True), torch.randn(12, requires_grad=True)
    inputs = torch.randn(2, 3, 4, requires_grad=True)
    rows = qkv_rows(9, torch.device('cpu')) if rows == 'qkv' else rows
    out_features = len(rows) if isinstance(rows, torch.Tensor) else rows
    block = weight[rows, :4] if isinstance(rows, torch.Tensor) else weight[:rows, :4]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        expected = torch.nn.functional.linear(inputs, block, bias[:out_features])
        ours = SlicedLinear.apply(inputs, weight, bias, rows, 4)
    assert ours.dtype == expected.dtype == torch.bfloat16 and torch.equal(ours, expected)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (inputs, weight, bias), grad),
                    torch.autograd.grad(expected, (inputs, weight, bias), grad)):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-2, atol=1e-2)


def test_attention_under_bf16_autocast_runs_forward_and_backward_near_the_direct_formulation(attention_path):
    torch.manual_seed(0)
    attention = Attention(192, 3, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0., rpe=True, rpe_length=4)
    x = torch.randn(2, 50, 192)

    def run():
        attention.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = attention(x)
        out.float().sum().backward()
        return out.float(), attention.rel_pos_embed_k.embeddings_table_v.grad.clone()

    ours = run()
    with direct_rpe():
        reference = run()
    assert ours[0].dtype == torch.float32 and all(norm_relative_error(a, b) < 3e-2 for a, b in zip(ours, reference))


@pytest.mark.parametrize('name', ['demo', 'tiny'])
def test_fused_supernet_equals_the_direct_formulation_for_every_depth_and_head_count(name, monkeypatch):
    """Float64, forward and every gradient: each depth with each head count of the space, all other
    choices drawn at random; SDPA with the relative positions as columns against the direct formulation."""
    from arch import complete_space_kwargs, make_arch
    from space import AutoformerSpace, build_supernet, set_active_arch
    monkeypatch.setattr(layers, 'SDPA_DEVICES', {'cpu'})
    space_kwargs = complete_space_kwargs(**AutoformerSpace.preset(name), drop_path_rate=0.0)
    torch.manual_seed(0)
    supernet = build_supernet(space_kwargs).double()
    for module in supernet.modules():  # training-scale tables, not init's
        if isinstance(module, layers.RelativePosition2D):
            torch.nn.init.normal_(module.embeddings_table_v)
            torch.nn.init.normal_(module.embeddings_table_h)
    images = torch.randn(1 if name == 'tiny' else 2, 3, space_kwargs['img_size'], space_kwargs['img_size'],
                         dtype=torch.double)
    rng = random.Random(0)

    def run():
        supernet.zero_grad()
        out = supernet(images)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        return [out] + [p.grad.clone() for p in supernet.parameters() if p.grad is not None]

    for depth in space_kwargs['search_depth']:
        for heads in space_kwargs['search_num_heads']:
            ratios = [rng.choice(space_kwargs['search_mlp_ratio']) for _ in range(depth)]
            set_active_arch(supernet, make_arch(rng.choice(space_kwargs['search_embed_dim']), ratios, [heads] * depth))
            fused = run()
            with direct_rpe():
                reference = run()
            assert len(fused) == len(reference) > 10
            errors = [norm_relative_error(a, b) for a, b in zip(fused, reference)]
            assert max(errors) < 1e-10, (depth, heads, max(errors))
