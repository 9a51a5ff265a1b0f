"""torch.compile of the model in place (train_params.compile, train_params.compile_mode).

Parts are compiled where they live, so parameters and state_dict keys stay those of the plain
module and checkpoints do not change. With a CUDA-graph mode ("reduce-overhead") every compiled
part is replayed as one CUDA graph, so the host no longer launches its kernels one by one (for
MapAnything no faster than the default mode, whose host time left is in the eager criterion;
docs/mapanything.md, Speed).
"""

from __future__ import annotations

import functools
import types

import torch

# torch.compile's modes; "default" is torch.compile's own default.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The modes that replay compiled parts as CUDA graphs (on a GPU; on a CPU they compile as "default").
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_settings(tp) -> str:
    """The validated train_params.compile_mode; refuses what CUDA graphs would get wrong."""
    mode = _checked_mode(str(tp.compile_mode or "default"))
    if mode in CUDA_GRAPH_MODES and tp.compile and int(tp.accum_iter) > 1:
        # A CUDA graph writes each step's parameter gradients into the same buffers, so a gradient
        # kept across micro-batches is overwritten, not accumulated (pytorch/pytorch#169545).
        raise ValueError(
            f"train_params.compile_mode={mode} (CUDA graphs) cannot accumulate gradients: set "
            f"train_params.accum_iter=1 (it is {tp.accum_iter}) or compile_mode=default"
        )
    return mode


def compile_in_place(module: torch.nn.Module, what, mode: str = "default") -> None:
    """torch.compile the whole model (true) or the named parts (a list), in place. A name is a
    submodule (`encoder`, `info_sharing`), a method of the model or of a submodule
    (`downstream_head`), which is then replaced on that instance only, or `<list>.*`: every block
    of a ModuleList compiled on its own (regional compilation, `encoder.model.blocks.*`). Blocks
    of one class share their compiled code, so Dynamo traces one block where a whole part makes it
    trace all of them: much shorter compiles, and shorter restarts from the compile cache, which
    caches kernels but not Dynamo's tracing. Compiling a part again (another mode) replaces the
    earlier compilation."""
    options = {} if _checked_mode(mode) == "default" else {"mode": mode}
    names = [""] if what is True else list(what)
    for name in names:
        if name.endswith(".*"):
            blocks = _blocks(module, name[:-2])
            _share_one_class(blocks)
            for block in blocks:
                _compile_module(block, options)
                block.__class__ = _with_none_for_none_lists(type(block))
            continue
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = module.get_submodule(owner_name)
            target = owner if not name else getattr(owner, attr)
        except AttributeError as err:
            raise ValueError(f"train_params.compile names {name!r}, which the model does not have: {err}") from err
        if isinstance(target, torch.nn.Module):
            _compile_module(target, options)
            target.__class__ = _with_batch_dims_marked(type(target))
        elif callable(target):
            original = getattr(target, "_uncompiled", target)
            setattr(owner, attr, _with_contiguous_output(torch.compile(original, **options), original))
        else:
            raise ValueError(f"train_params.compile names {name!r}, which is neither a submodule nor a method")


def _blocks(module: torch.nn.Module, name: str) -> torch.nn.ModuleList:
    try:
        blocks = module.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"train_params.compile names {name + '.*'!r}, which the model does not have: {err}") from err
    if not isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential)):
        raise ValueError(f"train_params.compile names {name + '.*'!r}, but {name} is a {type(blocks).__name__}, "
                         f"not a list of blocks (ModuleList or Sequential); name it without '.*'")
    return blocks


def _share_one_class(blocks) -> None:
    """Give blocks, and their submodules, that differ only in their class object one class.
    MapAnything's uniception makes a class per module it wraps: per block for gradient
    checkpointing, per attention for SDPA in DINOv2's blocks. Dynamo guards on the class, so it
    would trace every block again and, past its recompile limit of 8, leave the rest uncompiled.
    Classes with the same bases and the same attributes (methods of the same code, closing over the
    same objects) behave identically, so the first block's classes serve all blocks."""
    if len(blocks) < 2:
        return
    first = dict(blocks[0].named_modules())
    for block in blocks[1:]:
        for name, module in block.named_modules():
            template = first.get(name)
            if template is not None and type(module) is not type(template) and \
                    _same_behaviour(type(module), type(template)):
                module.__class__ = type(template)


def _same_behaviour(a: type, b: type) -> bool:
    if a.__bases__ != b.__bases__ or vars(a).keys() != vars(b).keys():
        return False
    return all(key in ("__module__", "__doc__") or _same_attribute(vars(a)[key], vars(b)[key], a, b)
               for key in vars(a))


def _same_attribute(x, y, a: type, b: type) -> bool:
    if not (isinstance(x, types.FunctionType) and isinstance(y, types.FunctionType)):
        return x is y or (type(x) is type(y) and not callable(x) and x == y)
    if x.__code__ is not y.__code__ or x.__defaults__ != y.__defaults__:
        return False
    # A method using super() closes over its own class: a's and b's count as the same.
    cells = zip(x.__closure__ or (), y.__closure__ or (), strict=True)
    return all(cx.cell_contents is cy.cell_contents or (cx.cell_contents is a and cy.cell_contents is b)
               for cx, cy in cells)


_NONE_LIST_CLASSES: dict[type, type] = {}
_MARKING_CLASSES: dict[type, type] = {}


def _with_batch_dims_marked(cls: type) -> type:
    """A subclass of a compiled module's class whose call marks its inputs' leading dimensions
    dynamic (`_mark_batch_dims_dynamic`) before the compiled code sees them."""
    if cls.__dict__.get("_batch_dims_marked"):
        return cls
    if cls not in _MARKING_CLASSES:
        def __call__(self, *args, **kwargs):
            _mark_batch_dims_dynamic((args, kwargs))
            return super(subclass, self).__call__(*args, **kwargs)

        subclass = type(cls.__name__, (cls,), {"__call__": __call__, "_batch_dims_marked": True,
                                               "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _MARKING_CLASSES[cls] = subclass
    return _MARKING_CLASSES[cls]


def _with_none_for_none_lists(cls: type) -> type:
    """A subclass of a block's class whose call hands the block None for an argument that is a list
    or tuple of Nones only, before its compiled code sees the argument. uniception's multi-view
    transformer passes its blocks one position per token, all None where no custom positional
    encoding is used (its blocks read positions only with one, and then as a tensor). Dynamo guards
    on that list's length, which changes with the view count: it would compile every block again per
    view count, and Stage 3's nine view counts pass its recompile limit (8), beyond which the blocks
    run eagerly. Blocks of one class get one subclass, so they still share their compiled code."""
    if cls.__dict__.get("_none_lists_as_none"):
        return cls
    if cls not in _NONE_LIST_CLASSES:
        def __call__(self, *args, **kwargs):
            args = tuple(None if _nones_only(a) else a for a in args)
            kwargs = {k: None if _nones_only(v) else v for k, v in kwargs.items()}
            _mark_batch_dims_dynamic((args, kwargs))
            return super(subclass, self).__call__(*args, **kwargs)

        subclass = type(cls.__name__, (cls,), {"__call__": __call__, "_none_lists_as_none": True, "_batch_dims_marked": True,
                                               "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _NONE_LIST_CLASSES[cls] = subclass
    return _NONE_LIST_CLASSES[cls]


# The leading dimensions of a compiled part's inputs: images (views x samples), samples, or tokens
# (views x tokens per view), which Stage 3 changes from batch to batch.
BATCH_DIMS = (0, 1)


def _mark_batch_dims_dynamic(value) -> None:
    """Tell Dynamo that the leading dimensions of the tensors a compiled part is called with may
    change, before it compiles the part's first graph. Without this it compiles a static graph for
    the first shape and a symbolic one at the first change, for each part in turn as its sizes change
    (Stage 3's third shape, 8 views of 1 sample after 12 images twice, recompiled the image-batched
    parts); with it, one graph per part serves every shape. Dynamo still specializes a size of 1 (a
    batch of one sample), and a size a part's code ties to a constant (a channel count)."""
    if torch.is_tensor(value):
        for dim in BATCH_DIMS[:value.dim()]:
            torch._dynamo.maybe_mark_dynamic(value, dim)
    elif type(value) in (list, tuple):
        for item in value:
            _mark_batch_dims_dynamic(item)
    elif isinstance(value, dict):
        for item in value.values():
            _mark_batch_dims_dynamic(item)


def _nones_only(value) -> bool:
    return type(value) in (list, tuple) and len(value) > 0 and value.count(None) == len(value)


def mark_step_begin() -> None:
    """Start of a training or evaluation step. CUDA graphs hand out their outputs in buffers that
    the next replay overwrites; this tells them the previous step's outputs are no longer used.
    Costs nothing without CUDA graphs."""
    torch.compiler.cudagraph_mark_step_begin()


def _checked_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"train_params.compile_mode={mode!r} is not one of {', '.join(COMPILE_MODES)}")
    return mode


def _compile_module(target: torch.nn.Module, options: dict) -> None:
    # Compiled kernels may return other memory layouts than eager ones (channels-last convolution
    # outputs); code after the compiled part (a loss calling .view) expects eager's layouts.
    if not getattr(target, "_contiguous_hook", False):
        target.register_forward_hook(lambda _module, _inputs, output: _contiguous(output))
        target._contiguous_hook = True
    target.compile(**options)


def _with_contiguous_output(function, original):
    @functools.wraps(original)
    def call(*args, **kwargs):
        _mark_batch_dims_dynamic((args, kwargs))
        return _contiguous(function(*args, **kwargs))

    call._uncompiled = original
    return call


def _contiguous(value):
    if torch.is_tensor(value):
        return value.contiguous()
    if isinstance(value, dict):
        return {k: _contiguous(v) for k, v in value.items()}
    if type(value) in (list, tuple):  # not named tuples or dataclass-like containers
        return type(value)(_contiguous(v) for v in value)
    return value
