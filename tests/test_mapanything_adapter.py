"""The MapAnything adapter, its config, the preflight and model.pretrained formats.

The real-model test needs MapAnything (and the DINOv2 hub code in the torch hub cache);
without them it is skipped with the reason, everything else runs everywhere.
"""

import importlib.util
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mapanything_ext.models import offline
from mapanything_ext.config import compose_training
from mapanything_ext.models import mapanything_adapter
from mapanything_ext.models.compact import CompactMapAnything
from mapanything_ext.models.pretrained import PretrainedLoadError, load_pretrained
from mapanything_ext.models.registry import build_model
from tests.training_runs import run_training, start_ranks, tiny_overrides, wait_all

# A tiny MapAnything (DINOv2-small, 2 encoder blocks, 3 transformer layers) that trains on a CPU.
TINY_MAPANYTHING = [
    "model=mapanything", "loss=overall_loss", "model.encoder.size=small", "model.encoder.keep_first_n_layers=2",
    "model.info_sharing.module_args.depth=3", "model.info_sharing.module_args.dim=192",
    "model.info_sharing.module_args.num_heads=3", "model.info_sharing.module_args.indices=[0,1]",
    "model.pred_head.feature_head.feature_dim=32",
]


def test_config_reproduces_v1_1():
    m = compose_training(["model=mapanything", "loss=overall_loss"]).model
    assert (m.encoder.size, m.encoder.keep_first_n_layers, m.encoder.norm_returned_features) == ("giant", 24, False)
    args = m.info_sharing.module_args
    assert (args.depth, args.dim, args.num_heads, list(args.indices)) == (16, 1536, 24, [7, 11])
    assert m.info_sharing.model_type == "alternating_attention" and args.distinguish_ref_and_non_ref_views
    assert m.model_config.info_sharing_mlp_layer_str == "swiglufused"
    assert m.model_config.use_register_tokens_from_encoder is True
    assert m.pred_head.type == "dpt+pose" and m.pred_head.feature_head.feature_dim == 256
    assert m.pred_head.regressor_head.output_dim == 6
    assert m.pred_head.adaptor_config.dense_pred_init_dict.depth_vmax == float("inf")
    assert m.task.overall_prob == 0  # images only
    assert m.model_config.encoder_config.name == "dinov2_giant_24_layers"


def test_stage3_turns_on_every_gradient_checkpointing_switch():
    m = compose_training(["model=mapanything", "loss=overall_loss", "stage=stage3"]).model
    assert m.encoder.gradient_checkpointing and m.info_sharing.module_args.gradient_checkpointing
    assert m.pred_head.gradient_checkpointing and m.pred_head.feature_head.checkpoint_gradient
    one = compose_training(["model=mapanything", "model.encoder.gradient_checkpointing=true"]).model
    assert one.model_config.encoder_config.gradient_checkpointing and not one.pred_head.gradient_checkpointing


def test_missing_mapanything_says_how_to_install_and_what_runs_without_it():
    with pytest.raises(mapanything_adapter.MapAnythingMissing) as err:
        mapanything_adapter.import_mapanything("mapanything_not_installed_here")
    message = str(err.value)
    assert "not installed" in message and "pip install -e map-anything" in message
    assert "model=compact loss=compact_loss runs without it" in message


@pytest.mark.skipif(importlib.util.find_spec("mapanything") is not None, reason="MapAnything is installed here")
def test_model_mapanything_without_mapanything_fails_clearly():
    with pytest.raises(mapanything_adapter.MapAnythingMissing, match="model=compact"):
        build_model(compose_training(["model=mapanything"]).model)


def test_loss_strings_see_nothing_but_the_losses_namespace():
    with pytest.raises(ValueError, match="only names of MapAnything's losses module may be called"):
        mapanything_adapter._criterion("__import__('os').system('true')", {})
    assert mapanything_adapter._criterion("Weight(2) * 3", {"Weight": lambda w: w}) == 6


def hub_with_dinov2(tmp_path):
    code = tmp_path / "hub" / offline.DINOV2_HUB_REPO
    code.mkdir(parents=True)
    (code / "hubconf.py").write_text("dependencies = ['torch']\n")
    return tmp_path


def test_preflight_names_the_missing_hub_code(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    found = offline.problems_of(compose_training(["model=mapanything"]))
    expected = tmp_path / "hub" / offline.DINOV2_HUB_REPO
    assert any(f"copy the folder {offline.DINOV2_HUB_REPO}" in p and str(expected) in p for p in found), found


def test_preflight_refuses_hub_weights_with_a_full_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(hub_with_dinov2(tmp_path)))
    ckpt = tmp_path / "weights.pth"
    ckpt.write_bytes(b"x")
    cfg = compose_training(["model=mapanything", "model.encoder.torch_hub_pretrained=true", f"model.pretrained={ckpt}"])
    found = offline.problems_of(cfg)
    assert any("set model.encoder.torch_hub_pretrained=false" in p for p in found)
    assert not any("hub code" in p for p in found)
    cfg = compose_training(["model=mapanything", "model.encoder.torch_hub_pretrained=true"])
    assert any("dinov2_vitg14_pretrain.pth" in p for p in offline.problems_of(cfg))
    cfg = compose_training(["model=mapanything", "model.torch_hub_force_reload=true"])
    assert any("torch_hub_force_reload=true would download" in p for p in offline.problems_of(cfg))


def test_preflight_checks_model_pretrained_for_every_model(tmp_path):
    found = offline.problems_of(compose_training([f"model.pretrained={tmp_path / 'gone.pth'}"]))
    assert found == [f"model.pretrained={tmp_path / 'gone.pth'} does not exist (did the earlier stage finish? "
                     f"is the path visible from this node?)"]
    assert offline.problems_of(compose_training([])) == []
    # resuming its own checkpoint, a later stage no longer needs the earlier stage's file
    assert offline.problems_of(compose_training([f"model.pretrained={tmp_path / 'gone.pth'}"]), resuming=True) == []
    with pytest.raises(offline.PreflightError, match="gone.pth does not exist"):
        offline.check(compose_training([f"model.pretrained={tmp_path / 'gone.pth'}"]))


def small_model():
    torch.manual_seed(0)
    return CompactMapAnything(dim=32, depth=1, num_heads=2)


def test_pretrained_from_a_hugging_face_folder(tmp_path, capsys):
    source = small_model()
    folder = tmp_path / "map-anything"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": "compact"}))
    target = CompactMapAnything(dim=32, depth=1, num_heads=2)
    report = load_pretrained(target, folder)
    assert report["loaded"] == len(source.state_dict()) and not report["missing"]
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    assert f"[pretrained] {folder}: loaded {report['loaded']}/{report['loaded']} tensors (every entry matched)" \
        in capsys.readouterr().out


class Aliased(torch.nn.Module):
    """One Linear under two names, as MapAnything holds its DPT head (dense_head.0 is dpt_feature_head)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 4)
        self.dense = torch.nn.Sequential(self.head)
        self.other = torch.nn.Linear(4, 2)


def test_aliases_of_a_loaded_tensor_are_loaded_not_missing(tmp_path, capsys):
    source = Aliased()
    path = tmp_path / "model.safetensors"
    # safetensors keeps one name per shared tensor, as MapAnything's save_pretrained writes it
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("head.")}, str(path))
    target = Aliased()
    report = load_pretrained(target, path)
    assert (report["tensors"], report["loaded"], report["aliases"], report["missing"]) == (3 + 1, 4, 2, [])
    assert "(every entry matched)" in capsys.readouterr().out
    assert torch.equal(target.head.weight, source.head.weight)
    with torch.no_grad():  # they really are one tensor: a change under one name shows under the other
        target.state_dict()["dense.0.weight"].add_(1.0)
    assert torch.equal(target.state_dict()["head.weight"], source.head.weight + 1.0)


def test_mapanything_style_pth_needs_trust_and_reports_keys(tmp_path, capsys):
    state = small_model().state_dict()
    dropped = sorted(state)[0]
    state = {k: v for k, v in state.items() if k != dropped}
    state["extra.head.weight"] = torch.zeros(3)
    path = tmp_path / "facebook_map-anything.pth"
    torch.save({"model": state, "args": OmegaConf.create({"lr": 1e-4})}, path)
    with pytest.raises(Exception, match="trust_foreign_checkpoints=true"):
        load_pretrained(small_model(), path)
    report = load_pretrained(small_model(), path, trust_foreign=True)
    assert report["missing"] == [dropped] and report["unexpected"] == ["extra.head.weight"]
    out = capsys.readouterr().out
    assert f"missing 1 [{dropped}]" in out and "unexpected 1 [extra.head.weight]" in out


def test_a_load_that_matches_almost_nothing_is_an_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(PretrainedLoadError, match="matches only 0 of the model's"):
        load_pretrained(small_model(), path)


def test_export_refuses_what_mapanything_cannot_load(tmp_path):
    from mapanything_ext.checkpoint import save_on_master
    from mapanything_ext.export import ExportError, export, main

    path = save_on_master({"model": small_model().state_dict(), "optimizer": {}, "epoch": 0, "best_so_far": 1.0,
                           "args": {"model": {"name": "compact"}}, "resume": {"global_step": 1}},
                          tmp_path / "checkpoint-best.pth")
    with pytest.raises(ExportError, match="holds a 'compact' model; only model=mapanything"):
        export(path, tmp_path / "hf")
    assert main([f"checkpoint={tmp_path / 'missing.pth'}", f"out={tmp_path / 'hf'}"]) == 1
    with pytest.raises(SystemExit, match="usage: python -m mapanything_ext.export checkpoint="):
        main([f"checkpoint={path}"])


def why_the_real_model_cannot_run() -> str | None:
    import os
    from pathlib import Path

    if importlib.util.find_spec("mapanything") is None:
        return "MapAnything not installed (optional; docs/mapanything.md says how)"
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub"
    if not (hub / offline.DINOV2_HUB_REPO / "hubconf.py").is_file():
        return f"DINOv2 hub code not in the torch hub cache {hub}"
    return None


def tiny_real_training(synthetic_root, out, *extra) -> list[str]:
    """Training overrides of one epoch of the tiny MapAnything on the test data."""
    overrides = [o for o in tiny_overrides(synthetic_root, out, "train_params.epochs=1")
                 if not o.startswith(("model=", "loss=", "model."))]
    return [*overrides, *TINY_MAPANYTHING, "train_params.max_num_of_imgs_per_gpu=4", *extra]


@pytest.mark.slow
@pytest.mark.skipif(why_the_real_model_cannot_run() is not None, reason=str(why_the_real_model_cannot_run()))
def test_real_mapanything_trains_one_step_on_synthetic_views(synthetic_root, tmp_path):
    out = tmp_path / "mapanything"
    proc = run_training(tiny_real_training(synthetic_root, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint-final.pth", weights_only=True)
    assert ckpt["args"]["model"]["name"] == "mapanything"
    record = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert torch.isfinite(torch.tensor(record["train_loss"])) and "OPV2VDataset_NonAmbiguousMaskLoss_mask_avg_med" in record
    console = (out / "console.log").read_text()  # loss.impl=auto: batched after agreeing on the first sample
    assert "train criterion: batched (all views at once), loss.impl=auto; agreed with the reference" in console
    assert "test criterion: batched (all views at once), loss.impl=auto; agreed with the reference" in console


@pytest.mark.slow
@pytest.mark.skipif(why_the_real_model_cannot_run() is not None, reason=str(why_the_real_model_cannot_run()))
def test_compiled_loss_parts_compute_what_the_eager_criterion_computes(synthetic_root, tmp_path, monkeypatch):
    """loss.compile=true fuses parts of MapAnything's criterion; loss, every detail and the
    gradients of the heads' parameters must stay those of the eager criterion."""
    from torch.utils.data import default_collate

    from mapanything_ext.models.registry import build_criteria
    from mapanything_ext.datasets.build import build_dataset

    losses = mapanything_adapter.import_mapanything("mapanything.train.losses")
    for name in mapanything_adapter.LOSS_FUNCTIONS:  # compiling patches them process-wide; undo at the end
        monkeypatch.setattr(losses, name, getattr(losses, name))
    overrides = [o for o in tiny_overrides(synthetic_root, tmp_path / "out") if not o.startswith(("model", "loss"))]
    # loss.compile compiles MapAnything's parts only where its criterion runs: loss.impl=reference.
    cfg = compose_training([*overrides, *TINY_MAPANYTHING, "dataset=opv2v_coop_ft", "loss.impl=reference"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    views = default_collate([build_dataset(cfg.dataset.train_dataset)[0]])
    heads = [p for name, p in model.named_parameters() if name.startswith(("dpt_regressor_head", "pose_head"))]
    assert heads

    def loss_details_grads(criterion):
        # A fresh forward each time: compiled backward graphs cannot be retained and run twice.
        torch.manual_seed(0)
        loss, details = criterion(views, model(views))
        return loss.detach(), details, torch.autograd.grad(loss, heads)

    eager = loss_details_grads(build_criteria(cfg.loss)[0])
    cfg.loss.compile = True
    compiled_criterion = build_criteria(cfg.loss)[0]
    assert hasattr(losses.compute_normal_loss, "_torchdynamo_orig_callable")
    compiled = loss_details_grads(compiled_criterion)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    assert compiled[1].keys() == eager[1].keys()
    for key, value in eager[1].items():
        assert compiled[1][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    for got, want in zip(compiled[2], eager[2]):  # fused fp32 sums reassociate: compare as vectors
        assert want.norm() > 0 and (got - want).norm() <= 1e-4 * want.norm()


@pytest.mark.slow
@pytest.mark.skipif(why_the_real_model_cannot_run() is not None, reason=str(why_the_real_model_cannot_run()))
def test_real_mapanything_trains_with_ddp_on_two_ranks(synthetic_root, tmp_path):
    """Unused parameters or a rank mismatch in the real model show up here, not on the cluster."""
    out = tmp_path / "ddp"
    overrides = tiny_real_training(synthetic_root, out, "train_params.max_steps_per_epoch=3",
                                   "train_params.max_eval_steps=1")
    assert wait_all(start_ranks(overrides, 2, tmp_path), timeout=900) == [0, 0]
    console = (out / "console.log").read_text()
    assert "world size 2 (DDP)" in console
    state = torch.load(out / "checkpoint-final.pth", weights_only=True)["resume"]
    assert state["global_step"] == 3 and state["consumed"] == 6


def tiny_real_model_and_views(synthetic_root, tmp_path):
    from torch.utils.data import default_collate

    from mapanything_ext.datasets.build import build_dataset

    overrides = [o for o in tiny_overrides(synthetic_root, tmp_path / "out") if not o.startswith(("model", "loss"))]
    cfg = compose_training([*overrides, *TINY_MAPANYTHING, "dataset=opv2v_coop_ft"])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model).eval(), default_collate([build_dataset(cfg.dataset.train_dataset)[0]])


@pytest.mark.slow
@pytest.mark.skipif(why_the_real_model_cannot_run() is not None, reason=str(why_the_real_model_cannot_run()))
def test_real_mapanything_reads_images_only(synthetic_root, tmp_path):
    from mapanything_ext.models.input_contract import check_images_only

    _, model, views = tiny_real_model_and_views(synthetic_root, tmp_path)
    check_images_only(model, views)


@pytest.mark.slow
@pytest.mark.skipif(why_the_real_model_cannot_run() is not None, reason=str(why_the_real_model_cannot_run()))
def test_export_round_trip_through_mapanythings_own_from_pretrained(synthetic_root, tmp_path, capsys):
    from mapanything_ext.checkpoint import save_on_master
    from mapanything_ext.config import to_plain
    from mapanything_ext.export import export

    cfg, model, views = tiny_real_model_and_views(synthetic_root, tmp_path)
    ours = tmp_path / "checkpoint-best.pth"
    save_on_master({"model": model.state_dict(), "optimizer": {}, "epoch": 0, "best_so_far": 1.0,
                    "args": to_plain(cfg), "resume": {"epoch": 0, "global_step": 1, "epoch_complete": True}}, ours)
    folder = export(ours, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["info_sharing_config"]["module_args"].get("mlp_layer") is None  # JSON values only
    assert config["info_sharing_mlp_layer_str"] == "swiglufused"
    models = mapanything_adapter.import_mapanything("mapanything.models")
    theirs = models.MapAnything.from_pretrained(str(folder), strict=True).eval()  # no missing/unexpected key
    assert theirs.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        a, b = model(views), theirs(views)
    for x, y in zip(a, b):
        for key in x:
            if torch.is_tensor(x[key]):
                assert torch.equal(x[key], y[key]), key
    # our loader reads the same folder: every tensor matched, the aliases counted as such
    fresh = build_model(cfg.model)
    report = load_pretrained(fresh, folder)
    assert not (report["missing"] or report["unexpected"] or report["shape_mismatch"])
    assert report["aliases"] == 76 and "(every entry matched)" in capsys.readouterr().out
    with torch.no_grad():  # aliased names really share storage after the load
        fresh.state_dict()["dense_head.0.scratch.layer1_rn.weight"].add_(1.0)
    assert torch.equal(fresh.state_dict()["dpt_feature_head.scratch.layer1_rn.weight"],
                       fresh.state_dict()["dense_head.0.scratch.layer1_rn.weight"])


@pytest.mark.skipif(importlib.util.find_spec("mapanything") is None, reason="MapAnything not installed")
def test_v1_1_loss_strings_build_the_criterion_eval_would_build():
    """The parser builds exactly what MapAnything's own `eval` of its strings builds."""
    losses = mapanything_adapter.import_mapanything("mapanything.train.losses")
    namespace = {name: getattr(losses, name) for name in dir(losses) if not name.startswith("_")}
    cfg = compose_training(["model=mapanything", "loss=overall_loss"]).loss
    for expression in (cfg.train_criterion, cfg.test_criterion):
        ours = mapanything_adapter._criterion(expression, namespace)
        reference = eval(expression, dict(namespace))  # noqa: S307 -- the reference behaviour, in a test only
        assert repr(ours) == repr(reference) and type(ours) is type(reference)
