"""train_params.compile / compile_mode: compiled in place, settings checked, and CUDA-graph
training (compile_mode=reduce-overhead) exact where a GPU can run it."""

import copy

import pytest
import torch

from mapanything_ext.models.compact import CompactMapAnything
from mapanything_ext.train.compiling import _contiguous, check_compile_settings, compile_in_place, mark_step_begin
from mapanything_ext.train_params import TrainParams


def views_of(batch=2, num_views=3, h=28, w=42, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [{"img": torch.randn(batch, 3, h, w, generator=g).to(device)} for _ in range(num_views)]


def test_compile_mode_is_checked_and_cuda_graphs_refuse_gradient_accumulation():
    tp = TrainParams(compile=["blocks"], compile_mode="fast", accum_iter=1)
    with pytest.raises(ValueError, match="compile_mode='fast' is not one of default, reduce-overhead"):
        check_compile_settings(tp)
    tp.compile_mode = "reduce-overhead"
    assert check_compile_settings(tp) == "reduce-overhead"
    tp.accum_iter = 2
    with pytest.raises(ValueError, match=r"cannot accumulate gradients: set train_params.accum_iter=1 \(it is 2\)"):
        check_compile_settings(tp)
    tp.compile_mode = "default"
    assert check_compile_settings(tp) == "default"
    tp.compile, tp.compile_mode = False, "reduce-overhead"  # nothing compiled: nothing to refuse
    assert check_compile_settings(tp) == "reduce-overhead"
    assert check_compile_settings(TrainParams()) == "default"
    with pytest.raises(ValueError, match="compile_mode='fast'"):
        compile_in_place(CompactMapAnything(dim=32, depth=1, num_heads=2), ["blocks"], "fast")


def test_compile_in_place_names_a_missing_part_compiles_methods_and_keeps_layouts():
    model = CompactMapAnything(dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="train_params.compile names 'no_such_part'"):
        compile_in_place(model, ["no_such_part"])
    with pytest.raises(ValueError, match="'dim', which is neither a submodule nor a method"):
        compile_in_place(model, ["dim"])
    keys = list(model.state_dict())
    compile_in_place(model, ["_dense"])  # a method: replaced on this instance only (compiled lazily)
    assert "_dense" in vars(model) and "_dense" not in vars(CompactMapAnything(dim=32, depth=1, num_heads=2))
    compile_in_place(model, ["blocks.0.forward"])  # a submodule's method (as encoder.model.prepare_tokens_with_masks)
    assert "forward" in vars(model.blocks[0]) and "forward" not in vars(model.blocks[1])
    assert list(model.state_dict()) == keys
    strided = torch.zeros(4, 6).t()
    out = _contiguous([{"a": strided, "b": 3}])
    assert out[0]["a"].is_contiguous() and torch.equal(out[0]["a"], strided) and out[0]["b"] == 3


def test_regional_compilation_compiles_each_block_and_traces_one_for_all():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = CompactMapAnything(dim=16, depth=2, num_heads=2)
    eager = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"'head_norm.\*', but head_norm is a LayerNorm, not a list of blocks"):
        compile_in_place(model, ["head_norm.*"])
    with pytest.raises(ValueError, match=r"names 'stages.\*', which the model does not have"):
        compile_in_place(model, ["stages.*"])
    compile_in_place(model, ["blocks.*"])
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert model._compiled_call_impl is None and model.head_norm._compiled_call_impl is None
    assert list(model.state_dict()) == list(eager.state_dict())
    tokens = torch.randn(2, 5, 16)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0](tokens), eager.blocks[0](tokens))
        traced = counters["stats"]["unique_graphs"]
        for block, plain in zip(model.blocks[1:], eager.blocks[1:]):
            torch.testing.assert_close(block(tokens), plain(tokens))
    # Four blocks of one class, one shape: the first was traced, the other three reuse its code.
    assert len(model.blocks) == 4 and traced > 0 and counters["stats"]["unique_graphs"] == traced


def _checkpointed_per_block(module):
    """Gradient checkpointing the way uniception applies it: a new subclass for every block."""
    class Checkpointed(module.__class__):
        def forward(self, *args, **kwargs):
            return torch.utils.checkpoint.checkpoint(super().forward, *args, use_reentrant=False, **kwargs)

    module.__class__ = Checkpointed
    return module


def _wrapped_per_module(module, factor=1.0):
    """A submodule re-classed per instance, as uniception's SDPA wrapper does to DINOv2's attention."""
    class Wrapped(module.__class__):
        def forward(self, x):
            return super().forward(x) * factor

    module.__class__ = Wrapped
    return module


def test_regional_compilation_of_blocks_checkpointed_each_with_its_own_class_traces_one():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = CompactMapAnything(dim=16, depth=2, num_heads=2)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = _checkpointed_per_block(block)
        _wrapped_per_module(block.norm2)
    plain = copy.deepcopy(model)
    assert len({type(block) for block in model.blocks}) == len({type(b.norm2) for b in model.blocks}) == 4
    compile_in_place(model, ["blocks.*"])
    # same code, closing over the same objects: one class each now, blocks and submodules
    assert len({type(block) for block in model.blocks}) == len({type(b.norm2) for b in model.blocks}) == 1

    torch._dynamo.reset()
    counters.clear()
    grads = []
    for net in (model, plain):
        tokens = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = tokens
        for block in net.blocks:
            out = block(out)
            if net is model and block is net.blocks[0]:
                traced = counters["stats"]["unique_graphs"]
        out.square().sum().backward()
        grads.append(tokens.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert traced > 0 and counters["stats"]["unique_graphs"] == traced

    class Other(torch.nn.Linear):  # other code: never given another block's class
        def forward(self, x):
            return super().forward(x) * 2

    blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2), Other(2, 2)])
    compile_in_place(torch.nn.Sequential(blocks), ["0.*"])
    assert isinstance(blocks[1], Other) and not isinstance(blocks[0], Other)
    # the same code closing over other objects behaves differently: classes kept
    scaled = torch.nn.ModuleList([_wrapped_per_module(torch.nn.Linear(2, 2), f) for f in (1.0, 2.0)])
    compile_in_place(torch.nn.Sequential(scaled), ["0.*"])
    assert type(scaled[0]) is not type(scaled[1])


class _PositionedBlock(torch.nn.Module):
    """A block called as uniception's multi-view transformer calls its blocks: (tokens, positions),
    the positions a list of one None per token where no positional encoding uses them."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, xpos=None):
        if torch.is_tensor(xpos):
            x = x + xpos
        return self.linear(x).relu()


def test_compiled_blocks_take_a_list_of_nones_of_any_length_without_compiling_again():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([_PositionedBlock() for _ in range(3)])
    eager = copy.deepcopy(blocks)
    compile_in_place(torch.nn.Sequential(blocks), ["0.*"])
    assert len({type(block) for block in blocks}) == 1
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for views in range(2, 14):  # more lengths than Dynamo's recompile limit (8)
            tokens = torch.randn(1, 3 * views, 4)
            out, plain = tokens, tokens
            for block, reference in zip(blocks, eager):
                out, plain = block(out, [None] * (3 * views + 1)), reference(plain, [None] * (3 * views + 1))
            torch.testing.assert_close(out, plain)
            if views == 4:  # a static graph, then a dynamic one: no graph per new list length after
                graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    positions = torch.ones(1, 6, 4)  # a tensor (or a list holding one) still reaches the block
    torch.testing.assert_close(blocks[0](torch.zeros(1, 6, 4), positions), eager[0](torch.zeros(1, 6, 4), positions))


class _Mixer(torch.nn.Module):
    """Images (N, 3, H, W) or tokens (B, T, C) in, as the image-batched and view-batched parts."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        return self.linear(x).softmax(dim=1)

    def pooled(self, x):
        return x.mean(dim=(2, 3)) * x.shape[0]


def test_every_compiled_part_compiles_one_graph_for_all_leading_sizes_but_one():
    """Stage 3 changes images per batch (views x samples) and tokens per sample (views x tokens):
    each compiled part (a module, a method, regional blocks) compiles one graph for all of them,
    where Dynamo alone compiled a static graph first and a symbolic one at the first change, part
    by part. A size of 1 (one sample) is still its own graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = _Mixer()
    eager = copy.deepcopy(model)
    compile_in_place(model, ["", "pooled", "blocks.*"])
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for batch, tokens in [(12, 6), (12, 6), (8, 24), (5, 40), (3, 7)]:
        x = torch.randn(batch, tokens, 4)
        torch.testing.assert_close(model(x), eager(x))
        for block, reference in zip(model.blocks, eager.blocks):
            torch.testing.assert_close(block(x), reference(x))
        images = torch.randn(batch, 3, 5, 7)
        torch.testing.assert_close(model.pooled(images), eager.pooled(images))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs == [graphs[0]] * len(graphs)  # the first sizes' graphs serve all
    model(torch.randn(1, 6, 4))
    assert counters["stats"]["unique_graphs"] > graphs[0]


def test_compiling_again_replaces_the_earlier_compilation():
    model = CompactMapAnything(dim=32, depth=1, num_heads=2)
    compile_in_place(model, ["_dense", "head_norm"])
    first = vars(model)["_dense"]
    compile_in_place(model, ["_dense", "head_norm"], "max-autotune-no-cudagraphs")
    again = vars(model)["_dense"]
    # The method is compiled from the plain one, not from the first compilation (no nesting).
    assert again is not first and again._uncompiled == first._uncompiled == CompactMapAnything._dense.__get__(model)
    assert len(model.head_norm._forward_hooks) == 1  # one contiguous-output hook, not one per compile


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; none here (run on a GPU machine)")
def test_cuda_graph_training_matches_eager_training():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = CompactMapAnything(dim=64, depth=2, num_heads=2).cuda()
    graphed = copy.deepcopy(eager)
    parts = [f"blocks.{i}" for i in range(len(graphed.blocks))] + ["refine", "_dense"]
    compile_in_place(graphed, parts, "reduce-overhead")
    models = {"eager": eager, "graphed": graphed}
    # Plain SGD: parameters move by their gradients alone (Adam would blow up the rounding noise of
    # gradients that are zero in exact arithmetic, such as the attention key bias's).
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.05) for k, m in models.items()}
    losses = {k: [] for k in models}
    counters["inductor"].clear()
    for step in range(5):  # CUDA graphs record on the second call and replay from the third
        views = views_of(seed=step, device="cuda")
        for name, model in models.items():
            mark_step_begin()
            preds = model(views)
            loss = sum(p["pts3d"].square().mean() + p["cam_trans"].abs().sum() for p in preds)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            losses[name].append(float(loss.detach()))
    assert counters["inductor"]["cudagraph_skips"] == 0, "a compiled part ran without CUDA graphs"
    assert losses["graphed"] == pytest.approx(losses["eager"], rel=1e-4)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
