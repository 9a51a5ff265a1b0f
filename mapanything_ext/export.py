"""Export a fine-tuned checkpoint as a Hugging Face model folder for MapAnything's own code.

usage: python -m mapanything_ext.export checkpoint=<checkpoint-best.pth> out=<folder>

Reads one of our checkpoints (weights_only, verified first), rebuilds the MapAnything
architecture it was trained with (its recorded `args.model`), and writes `config.json` +
`model.safetensors` through MapAnything's own `save_pretrained`, so that
`MapAnything.from_pretrained(<folder>)` (its inference and demo code) loads it with no missing
or unexpected keys. Needs MapAnything installed (docs/mapanything.md).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from mapanything_ext.checkpoint import load_checkpoint, verify_checkpoint


class ExportError(RuntimeError):
    """The checkpoint cannot be exported (missing, invalid, not a MapAnything model)."""


def export(checkpoint, out) -> Path:
    from mapanything_ext.models.mapanything_adapter import build_mapanything_model, save_hf_folder

    checkpoint, out = Path(checkpoint), Path(out)
    result = verify_checkpoint(checkpoint)
    if not result.valid:
        raise ExportError(f"{checkpoint} is not a valid checkpoint of ours: {result.reason}")
    ckpt = load_checkpoint(checkpoint)
    model_cfg = OmegaConf.create(ckpt["args"]["model"])
    if model_cfg.get("name") != "mapanything":
        raise ExportError(f"{checkpoint} holds a {model_cfg.get('name')!r} model; only model=mapanything checkpoints "
                          f"export to MapAnything's Hugging Face layout")
    started = time.perf_counter()
    model = build_mapanything_model(model_cfg)
    model.load_state_dict(ckpt["model"])  # strict: every key of the trained model
    folder = save_hf_folder(model, model_cfg, out)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    print(f"[export] {checkpoint} (epoch {ckpt['epoch']}) -> {folder} ({size / 1e9:.2f} GB) in "
          f"{time.perf_counter() - started:.1f}s; load it with MapAnything.from_pretrained({str(folder)!r})", flush=True)
    return folder


def parse(argv: list[str]) -> dict:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        raise SystemExit(0)
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = [a for a in argv if "=" not in a] + [k for k in args if k not in ("checkpoint", "out")]
    if unknown or not {"checkpoint", "out"} <= set(args):
        raise SystemExit(f"usage: python -m mapanything_ext.export checkpoint=<our .pth> out=<folder> "
                         f"(got {' '.join(argv) or 'nothing'})")
    return args


def main(argv=None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        export(args["checkpoint"], args["out"])
    except ExportError as err:
        print(f"[export] error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
