"""Translate a split (target images -> source style) with a trained translator.

The output folder is a dataset split of its own: ``images/NNNNNN.png`` (the translated images, full size)
and ``annotations.json``, a copy of the input's with the same image and annotation ids, ``file_name``
pointing at the translated images, no ``image_root`` and no depth / instance files (they describe the
original pixels). ``info.translated_by`` records the variant and the translator's sha256. The folder is
written beside its final place and renamed in one step, so a failure leaves no partial output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from vspa.translation.data import read_image
from vspa.translation.generator import Translator, TranslatorConfig
from vspa.translation.grid import pad_to_multiple, to_uint8
from vspa.translation.trainer import MODEL_FORMAT
from vspa.utils import VspaError, sha256_file


def load_translator(path: str | os.PathLike, device="cpu") -> tuple[Translator, dict]:
    """The translator saved by ``translate_train`` (in eval mode on ``device``) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise VspaError(f"{path}: translator not found. Run the translate_train stage first or fix --model.")
    try:
        meta = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise VspaError(f"{path}: not a readable checkpoint ({exc}). Retrain with translate_train.") from exc
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise VspaError(f"{path}: not a translator saved by translate_train (format {MODEL_FORMAT} expected).")
    generator = Translator(TranslatorConfig(**meta["translator"]))
    generator.load_state_dict(meta["state_dict"])
    return generator.to(device).eval(), {k: v for k, v in meta.items() if k != "state_dict"}


@torch.no_grad()
def translate_image(generator: Translator, image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` in [-1, 1] -> translated ``[3, H, W]`` (reflection-padded to multiples of 4 and cropped back)."""
    h, w = image.shape[-2:]
    device = next(generator.parameters()).device
    return generator(pad_to_multiple(image[None].to(device)))[0, :, :h, :w]


def translate_split(
    model_path: str | os.PathLike,
    split_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    device="cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Translate every image of ``split_dir`` into ``out_dir`` (see the module doc). Returns a summary."""
    from vspa.data.coco import atomic_dir, load_coco, write_coco

    split_dir, out_dir = Path(split_dir), Path(out_dir)
    json_path = split_dir / "annotations.json"
    if not json_path.is_file():
        raise VspaError(f"{json_path}: annotations not found. Run the prepare stage or fix --data.")
    data = load_coco(json_path)  # validates boxes, categories, ids and that every image is readable
    annotations = json.loads(json_path.read_text())["annotations"]
    generator, meta = load_translator(model_path, device)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        images_out = []
        for index, image in enumerate(
            tqdm(data.images, desc=f"translate_apply {meta['variant']}", unit="img", disable=None if progress else True)
        ):
            translated = translate_image(generator, read_image(data.image_path(image)))
            file_name = f"images/{index:06d}.png"
            Image.fromarray(to_uint8(translated)).save(tmp / file_name, format="PNG")
            kept = {k: v for k, v in image.items() if k not in ("depth_file", "instance_file")}
            images_out.append({**kept, "file_name": file_name})
        info = {
            **data.info,
            "translated_by": {
                "variant": meta["variant"],
                "model": str(model_path),
                "model_sha256": sha256_file(model_path),
                "source_split": str(split_dir),
            },
        }
        write_coco(tmp / "annotations.json", images_out, annotations, data.category_records, info)
    return {"images": len(images_out), "variant": meta["variant"], "out_dir": str(out_dir)}
