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

from mapanything_ext import preflight
from mapanything_ext.config import compose_training
from mapanything_ext.models import mapanything_adapter
from mapanything_ext.models.compact import CompactMapAnything
from mapanything_ext.models.pretrained import PretrainedLoadError, load_pretrained
from mapanything_ext.models.registry import build_model
from tests.training_runs import run_training, tiny_overrides

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
    with pytest.raises(ValueError, match="cannot build the MapAnything criterion"):
        mapanything_adapter._criterion("__import__('os').system('true')", {})
    assert mapanything_adapter._criterion("Weight(2) * 3", {"Weight": lambda w: w}) == 6


def hub_with_dinov2(tmp_path):
    code = tmp_path / "hub" / preflight.DINOV2_HUB_REPO
    code.mkdir(parents=True)
    (code / "hubconf.py").write_text("dependencies = ['torch']\n")
    return tmp_path


def test_preflight_names_the_missing_hub_code(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    found = preflight.problems_of(compose_training(["model=mapanything"]))
    expected = tmp_path / "hub" / preflight.DINOV2_HUB_REPO
    assert any(f"copy the folder {preflight.DINOV2_HUB_REPO}" in p and str(expected) in p for p in found), found


def test_preflight_refuses_hub_weights_with_a_full_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(hub_with_dinov2(tmp_path)))
    ckpt = tmp_path / "weights.pth"
    ckpt.write_bytes(b"x")
    cfg = compose_training(["model=mapanything", "model.encoder.torch_hub_pretrained=true", f"model.pretrained={ckpt}"])
    found = preflight.problems_of(cfg)
    assert any("set model.encoder.torch_hub_pretrained=false" in p for p in found)
    assert not any("hub code" in p for p in found)
    cfg = compose_training(["model=mapanything", "model.encoder.torch_hub_pretrained=true"])
    assert any("dinov2_vitg14_pretrain.pth" in p for p in preflight.problems_of(cfg))
    cfg = compose_training(["model=mapanything", "model.torch_hub_force_reload=true"])
    assert any("torch_hub_force_reload=true would download" in p for p in preflight.problems_of(cfg))


def test_preflight_checks_model_pretrained_for_every_model(tmp_path):
    found = preflight.problems_of(compose_training([f"model.pretrained={tmp_path / 'gone.pth'}"]))
    assert found == [f"model.pretrained={tmp_path / 'gone.pth'} does not exist (did the earlier stage finish? "
                     f"is the path visible from this node?)"]
    assert preflight.problems_of(compose_training([])) == []
    # resuming its own checkpoint, a later stage no longer needs the earlier stage's file
    assert preflight.problems_of(compose_training([f"model.pretrained={tmp_path / 'gone.pth'}"]), resuming=True) == []
    with pytest.raises(preflight.PreflightError, match="gone.pth does not exist"):
        preflight.check(compose_training([f"model.pretrained={tmp_path / 'gone.pth'}"]))


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
    assert f"[pretrained] {folder}: loaded {report['loaded']}/{report['loaded']} entries" in capsys.readouterr().out


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


def why_the_real_model_cannot_run() -> str | None:
    import os
    from pathlib import Path

    if importlib.util.find_spec("mapanything") is None:
        return "MapAnything not installed (optional; docs/mapanything.md says how)"
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub"
    if not (hub / preflight.DINOV2_HUB_REPO / "hubconf.py").is_file():
        return f"DINOv2 hub code not in the torch hub cache {hub}"
    return None


@pytest.mark.slow
@pytest.mark.skipif(why_the_real_model_cannot_run() is not None, reason=str(why_the_real_model_cannot_run()))
def test_real_mapanything_trains_one_step_on_synthetic_views(synthetic_root, tmp_path):
    out = tmp_path / "mapanything"
    overrides = [o for o in tiny_overrides(synthetic_root, out, "train_params.epochs=1")
                 if not o.startswith(("model=", "loss=", "model."))]
    proc = run_training([*overrides, *TINY_MAPANYTHING, "train_params.max_num_of_imgs_per_gpu=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint-final.pth", weights_only=True)
    assert ckpt["args"]["model"]["name"] == "mapanything"
    record = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert torch.isfinite(torch.tensor(record["train_loss"])) and "test_NonAmbiguousMaskLoss_mask_avg" in record


@pytest.mark.slow
@pytest.mark.skipif(why_the_real_model_cannot_run() is not None, reason=str(why_the_real_model_cannot_run()))
def test_compiled_loss_parts_compute_what_the_eager_criterion_computes(synthetic_root, tmp_path, monkeypatch):
    """loss.compile=true fuses parts of MapAnything's criterion; loss, every detail and the
    gradients of the heads' parameters must stay those of the eager criterion."""
    from torch.utils.data import default_collate

    from mapanything_ext.models.registry import build_criteria
    from mapanything_ext.train.data import build_dataset

    losses = mapanything_adapter.import_mapanything("mapanything.train.losses")
    for name in mapanything_adapter.LOSS_FUNCTIONS:  # compiling patches them process-wide; undo at the end
        monkeypatch.setattr(losses, name, getattr(losses, name))
    overrides = [o for o in tiny_overrides(synthetic_root, tmp_path / "out") if not o.startswith(("model", "loss"))]
    cfg = compose_training([*overrides, *TINY_MAPANYTHING, "dataset=opv2v_coop_ft"])
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
