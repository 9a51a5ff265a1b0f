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

from mapanything_ext.dynamic_dims import mark_leading_dims_dynamic

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
                _compile_module(block, options, none_lists_as_none=True)
            continue
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = module.get_submodule(owner_name)
            target = owner if not name else getattr(owner, attr)
        except AttributeError as err:
            raise ValueError(f"train_params.compile names {name!r}, which the model does not have: {err}") from err
        if isinstance(target, torch.nn.Module):
            _compile_module(target, options)
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


_CALLING_CLASSES: dict[tuple[type, bool], type] = {}


def _calling_class(cls: type, none_lists_as_none: bool = False) -> type:
    """A subclass of a compiled module's class whose call prepares the arguments before its compiled
    code sees them: their leading dimensions marked dynamic (`dynamic_dims`), one graph for every
    view count and batch size. With `none_lists_as_none` (regional blocks), an argument that is a
    list or tuple of Nones only is passed as None: uniception's multi-view transformer passes its
    blocks one position per token, all None where no custom positional encoding is used (its blocks
    read positions only with one, and then as a tensor), and Dynamo guards on that list's length,
    which changes with the view count; past its recompile limit (8; Stage 3 has nine view counts) the
    blocks would run eagerly. Modules of one class get one subclass, so blocks still share their
    compiled code."""
    base = cls.__dict__.get("_calling_base", cls)  # compiled again: the class under our subclass
    key = (base, none_lists_as_none)
    if key not in _CALLING_CLASSES:
        def __call__(self, *args, **kwargs):
            if none_lists_as_none:
                args = tuple(None if _nones_only(a) else a for a in args)
                kwargs = {k: None if _nones_only(v) else v for k, v in kwargs.items()}
            mark_leading_dims_dynamic((args, kwargs))
            return super(subclass, self).__call__(*args, **kwargs)

        subclass = type(base.__name__, (base,), {"__call__": __call__, "_calling_base": base,
                                                 "__module__": base.__module__, "__qualname__": base.__qualname__})
        _CALLING_CLASSES[key] = subclass
    return _CALLING_CLASSES[key]


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


def _compile_module(target: torch.nn.Module, options: dict, none_lists_as_none: bool = False) -> None:
    # Compiled kernels may return other memory layouts than eager ones (channels-last convolution
    # outputs); code after the compiled part (a loss calling .view) expects eager's layouts.
    if not getattr(target, "_contiguous_hook", False):
        target.register_forward_hook(lambda _module, _inputs, output: _contiguous(output))
        target._contiguous_hook = True
    target.compile(**options)
    target.__class__ = _calling_class(type(target), none_lists_as_none)


def _with_contiguous_output(function, original):
    @functools.wraps(original)
    def call(*args, **kwargs):
        mark_leading_dims_dynamic((args, kwargs))
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
