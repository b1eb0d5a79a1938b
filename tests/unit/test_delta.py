"""SparseDeltaLinear against a plain-torch dense reference: forward, gradients, memory, merge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speft_ds.methods.speft.delta import SparseDeltaEmbedding, SparseDeltaLinear
from speft_ds.methods.speft.delta_impls import delta_product, resolve


def make_base(out_features: int, in_features: int, gen: torch.Generator, dtype=torch.float32) -> nn.Linear:
    """A frozen Linear with bias and random weights (as the recipe freezes the model before injection)."""
    base = nn.Linear(in_features, out_features, bias=True, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        base.bias.copy_(torch.randn(out_features, generator=gen))
    base.requires_grad_(False)
    return base


def reference_dense(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense delta built independently: zeros, flat index assignment."""
    dense = torch.zeros(shape[0] * shape[1], dtype=values.dtype)
    dense[indices] = values
    return dense.reshape(shape)


def random_indices(numel: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(numel, generator=gen)[:k].sort().values


def index_cases():
    """(name, out, in, indices builder) for random shapes: k=1, k=all, a random k, rows left empty."""
    cases = []
    for seed, (out_f, in_f) in enumerate([(7, 5), (16, 24), (33, 9)]):
        cases += [
            pytest.param(seed, out_f, in_f, "one", id=f"k1-{out_f}x{in_f}"),
            pytest.param(seed, out_f, in_f, "all", id=f"kall-{out_f}x{in_f}"),
            pytest.param(seed, out_f, in_f, "random", id=f"krand-{out_f}x{in_f}"),
            pytest.param(seed, out_f, in_f, "empty_rows", id=f"emptyrows-{out_f}x{in_f}"),
        ]
    return cases


def build_indices(kind: str, out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    numel = out_f * in_f
    if kind == "one":
        return random_indices(numel, 1, gen)
    if kind == "all":
        return torch.arange(numel)
    if kind == "random":
        return random_indices(numel, int(torch.randint(2, numel, (1,), generator=gen)), gen)
    # Only every third row gets entries (about half of its columns): the other rows stay empty.
    rows = torch.arange(0, out_f, 3)
    flat = [r * in_f + c for r in rows.tolist() for c in random_indices(in_f, max(1, in_f // 2), gen).tolist()]
    return torch.tensor(sorted(flat), dtype=torch.int64)


IMPLS = ["dense", "sparse"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed,out_f,in_f,kind", index_cases())
def test_forward_and_gradients_match_dense_reference(seed, out_f, in_f, kind, impl):
    """Output, value gradients and input gradients equal those of F.linear(x, W + dense(delta), b), for
    each delta implementation."""
    gen = torch.Generator().manual_seed(1000 + seed)
    base = make_base(out_f, in_f, gen)
    indices = build_indices(kind, out_f, in_f, gen)
    values = torch.randn(indices.numel(), generator=gen)
    layer = SparseDeltaLinear(base, indices, values, impl)

    x = torch.randn(3, 4, in_f, generator=gen)
    upstream = torch.randn(3, 4, out_f, generator=gen)  # random weights of the summed outputs

    x_layer = x.clone().requires_grad_(True)
    out = layer(x_layer)
    (out * upstream).sum().backward()

    # Plain-torch reference: dense delta D as a leaf, the weight W + D applied with F.linear.
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    D = reference_dense(values, indices, (out_f, in_f)).requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    out_ref = F.linear(x_ref, W + D, b)
    (out_ref * upstream).sum().backward()

    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(layer.delta_values.grad, D.grad.reshape(-1)[indices])
    torch.testing.assert_close(x_layer.grad, x_ref.grad)
    assert layer.delta_values.grad.shape == indices.shape
    # The frozen base layer gets no gradient at all.
    assert not base.weight.requires_grad and base.weight.grad is None
    assert not base.bias.requires_grad and base.bias.grad is None
    # Sanity: the delta really changes the output (so the comparison above is not vacuous).
    assert not torch.allclose(out, F.linear(x, W, b))

    if kind == "empty_rows":
        # Output rows whose weight row has no entry are exactly the base layer's output.
        touched = torch.unique(indices // in_f)
        untouched = torch.tensor([r for r in range(out_f) if r not in set(touched.tolist())])
        assert untouched.numel() > 0
        torch.testing.assert_close(out[..., untouched], F.linear(x, W, b)[..., untouched])


def test_default_values_are_zero_and_output_is_base():
    """Without values the delta starts at zero: the layer computes exactly the base layer."""
    gen = torch.Generator().manual_seed(5)
    base = make_base(6, 10, gen)
    layer = SparseDeltaLinear(base, random_indices(60, 17, gen))
    assert layer.delta_values.dtype == torch.float32 and torch.count_nonzero(layer.delta_values) == 0
    assert layer.delta_values.requires_grad
    x = torch.randn(2, 3, 10, generator=gen)
    torch.testing.assert_close(layer(x), base(x))
    # The only trainable parameter is the values vector.
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["delta_values"]


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_base_with_fp32_values(impl):
    """A bf16 base layer and input with fp32 values: output close to the fp32 reference, fp32 value grads."""
    gen = torch.Generator().manual_seed(11)
    base32 = make_base(12, 20, gen)
    base16 = make_base(12, 20, gen).to(torch.bfloat16)
    base16.load_state_dict({k: v.to(torch.bfloat16) for k, v in base32.state_dict().items()})
    indices = random_indices(240, 50, gen)
    values = torch.randn(50, generator=gen)
    layer = SparseDeltaLinear(base16, indices, values, impl)
    x = torch.randn(2, 5, 20, generator=gen)

    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.delta_values.grad.dtype == torch.float32

    W = base16.weight.detach().float()
    D = reference_dense(values, indices, (12, 20)).requires_grad_(True)
    x16 = x.to(torch.bfloat16).float()
    out_ref = F.linear(x16, W + D, base16.bias.detach().float())
    out_ref.sum().backward()
    torch.testing.assert_close(out.float(), out_ref, atol=0.1, rtol=0.02)
    torch.testing.assert_close(layer.delta_values.grad, D.grad.reshape(-1)[indices], atol=0.1, rtol=0.02)


def _holds_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (list, tuple, set)):
        return any(_holds_tensor(o) for o in obj)
    if isinstance(obj, dict):
        return any(_holds_tensor(o) for o in obj.values())
    return False


def _delta_forward(path: str, gen: torch.Generator):
    """(forward, trainable values, frozen weight, an input) for each autograd path a delta takes: the merged linear
    (_MergedLinearFn), the base layer's own call plus the delta's product (_DeltaProductFn: quantized bases,
    and frozen deltas under drop_regrow's salience pass) in both impls, and the embedding delta."""
    if path == "embedding":
        base = nn.Embedding(60, 40).requires_grad_(False)
        layer = SparseDeltaEmbedding(base, random_indices(base.weight.numel(), 300, gen), torch.randn(300, generator=gen))
        return layer, layer.delta_values, base.weight, torch.randint(0, 60, (2, 3), generator=gen)
    form, impl = path.split("-")
    base = make_base(48, 40, gen)
    layer = SparseDeltaLinear(base, random_indices(48 * 40, 300, gen), torch.randn(300, generator=gen), impl)
    x = torch.randn(2, 3, 40, generator=gen, requires_grad=True)
    if form == "product":
        return (lambda x: base(x) + delta_product(x, layer.delta_values, layer.delta_indices, layer.shape, impl),
                layer.delta_values, base.weight, x)
    return layer, layer.delta_values, base.weight, x


@pytest.mark.parametrize("path", ["merged-dense", "merged-sparse", "product-dense", "product-sparse", "embedding"])
def test_backward_keeps_no_dense_copy_of_the_weight(path):
    """Everything autograd saves that is as large as the weight is the frozen weight itself (no dense
    delta or W + D copy), and no graph node keeps tensors as Python attributes (ctx.foo = tensor)."""
    forward, values, weight, x = _delta_forward(path, torch.Generator().manual_seed(3))
    assert x.numel() < weight.numel() and values.numel() < weight.numel()

    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(x)

    assert saved, "the forward saved nothing: the hook did not observe the graph"
    weight_ptr = weight.untyped_storage().data_ptr()
    for t in saved:
        if t.numel() >= weight.numel():
            assert t.untyped_storage().data_ptr() == weight_ptr, (
                f"a saved tensor of shape {tuple(t.shape)} is as large as the weight but is not the weight")
    # The linear paths need W (or W + D, rebuilt) for the input's gradient; the embedding's input has none.
    assert any(t.untyped_storage().data_ptr() == weight_ptr for t in saved) == (path != "embedding")

    seen, stack, custom_nodes = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        try:
            attributes = vars(node)
        except TypeError:  # C++ nodes have no __dict__
            attributes = None
        if attributes is not None:
            custom_nodes += 1
            held = [k for k, v in attributes.items() if _holds_tensor(v)]
            assert not held, f"{type(node).__name__} keeps tensors as attributes: {held}"
        stack.extend(fn for fn, _ in node.next_functions)
    assert custom_nodes == 1, "the delta's custom autograd Function was not found in the graph"

    out.sum().backward()  # the graph is usable after the checks
    assert values.grad is not None and weight.grad is None


@pytest.mark.parametrize("kind", ["one", "all", "random", "empty_rows"])
def test_merge_and_get_delta_weight(kind):
    """get_delta_weight is the dense delta; merge() returns the base layer with weight W + delta."""
    gen = torch.Generator().manual_seed(21)
    out_f, in_f = 9, 14
    base = make_base(out_f, in_f, gen)
    W0 = base.weight.detach().clone()
    indices = build_indices(kind, out_f, in_f, gen)
    values = torch.randn(indices.numel(), generator=gen)
    layer = SparseDeltaLinear(base, indices, values)
    dense = reference_dense(values, indices, (out_f, in_f))

    torch.testing.assert_close(layer.get_delta_weight(), dense)
    assert not layer.get_delta_weight().requires_grad

    x = torch.randn(4, in_f, generator=gen)
    before = layer(x).detach()
    merged = layer.merge()
    assert merged is base and type(merged) is nn.Linear
    torch.testing.assert_close(merged.weight, W0 + dense)
    torch.testing.assert_close(merged(x), before)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_under_autocast(impl):
    """fp32 weights and input under CPU bf16 autocast (HF Trainer's bf16 mode): the backward runs and the
    value gradients are close to the fp32 reference."""
    gen = torch.Generator().manual_seed(8)
    base = make_base(6, 8, gen)
    indices = random_indices(48, 10, gen)
    values = torch.randn(10, generator=gen)
    layer = SparseDeltaLinear(base, indices, values, impl)
    x = torch.randn(2, 3, 8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()

    D = reference_dense(values, indices, (6, 8)).requires_grad_(True)
    F.linear(x, base.weight + D, base.bias).sum().backward()
    torch.testing.assert_close(layer.delta_values.grad, D.grad.reshape(-1)[indices], atol=0.1, rtol=0.02)


@pytest.mark.parametrize("seed,vocab,dim,kind", index_cases())
def test_embedding_forward_and_value_grads_match_dense_reference(seed, vocab, dim, kind):
    """SparseDeltaEmbedding: output == F.embedding(ids, W + D); value grads == dense dW at the indices."""
    gen = torch.Generator().manual_seed(100 + seed)
    base = nn.Embedding(vocab, dim)
    with torch.no_grad():
        base.weight.copy_(torch.randn(vocab, dim, generator=gen))
    indices = build_indices(kind, vocab, dim, gen)
    values = torch.randn(indices.numel(), generator=gen)
    layer = SparseDeltaEmbedding(base, indices, values)
    assert not base.weight.requires_grad
    ids = torch.randint(0, vocab, (3, 5), generator=gen)
    upstream = torch.randn(3, 5, dim, generator=gen)

    out = layer(ids)
    (out * upstream).sum().backward()

    weight = (base.weight.detach() + reference_dense(values, indices, (vocab, dim))).requires_grad_(True)
    ref_out = F.embedding(ids, weight)
    (ref_out * upstream).sum().backward()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(layer.delta_values.grad, weight.grad.view(-1)[indices])
    assert base.weight.grad is None


def test_auto_picks_sparse_on_cpu_and_dense_on_accelerators():
    assert resolve("auto", "cpu") == "sparse" and resolve("auto", "cuda") == "dense"
    assert resolve("dense", "cpu") == "dense" and resolve("sparse", "cuda") == "sparse"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed,out_f,in_f,kind", index_cases())
def test_the_additive_form_matches_dense_reference(seed, out_f, in_f, kind, impl):
    """The delta's product alone (the form for quantized bases): x @ D^T, its input and value gradients."""
    gen = torch.Generator().manual_seed(2000 + seed)
    indices = build_indices(kind, out_f, in_f, gen)
    values = torch.randn(indices.numel(), generator=gen, requires_grad=True)
    x = torch.randn(3, 4, in_f, generator=gen, requires_grad=True)
    upstream = torch.randn(3, 4, out_f, generator=gen)
    (delta_product(x, values, indices.to(torch.int32), (out_f, in_f), impl) * upstream).sum().backward()

    D = reference_dense(values.detach(), indices, (out_f, in_f)).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, D) * upstream).sum().backward()
    torch.testing.assert_close(values.grad, D.grad.reshape(-1)[indices])
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_frozen_delta_keeps_the_base_layer_call(impl):
    """drop_regrow scores the model with frozen deltas through hooks on the base layers: those must fire."""
    gen = torch.Generator().manual_seed(9)
    base = make_base(10, 12, gen)
    indices = random_indices(120, 30, gen)
    layer = SparseDeltaLinear(base, indices, torch.randn(30, generator=gen), impl)
    layer.delta_values.requires_grad_(False)
    calls = []
    base.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 12, generator=gen)
    out = layer(x)
    assert calls == [1]
    torch.testing.assert_close(out, F.linear(x, base.weight + reference_dense(layer.delta_values, indices, (10, 12)),
                                             base.bias))
