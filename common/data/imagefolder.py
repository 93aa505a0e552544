"""ImageNet-style image data for the vision transformers: `<root>/train/<class>/*` and `<root>/val/<class>/*`.

Calibration: `nsamples` train images drawn uniformly without replacement with a seeded generator.
Evaluation: the whole val split, or with `limit=N` the first N images of a seeded permutation (a fixed,
class-mixed subset).  Preprocessing is the model's own eval transform (timm resolve_data_config + create_transform).
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

__all__ = ["DataError", "check_imagefolder", "model_transform", "image_folder", "calibration_images", "eval_loader"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data folder that is missing, empty or not an ImageFolder; the message names the flag and the path."""


def check_imagefolder(root: str, splits: tuple[str, ...] = ("train", "val")) -> None:
    """Cheap structural check (no image decoding): every split is a folder of class folders holding images."""
    if not os.path.isdir(root):
        raise DataError(f"--data_path: {root} is not a directory (expected an ImageNet-style root with train/ and val/)")
    for split in splits:
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise DataError(f"--data_path: missing folder {path} (expected {split}/<class>/<image> files)")
        classes = [d for d in os.scandir(path) if d.is_dir()]
        if not classes:
            raise DataError(f"--data_path: {path} has no class folders (expected {split}/<class>/<image> files)")
        if not any(f.lower().endswith(IMAGE_EXTENSIONS) for c in classes for f in os.listdir(c.path)):
            raise DataError(f"--data_path: no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}/<class>/")


def model_transform(model: nn.Module):
    """The model's timm eval transform (resize, center crop, normalize) from its pretrained config, at the input
    size the model was built with (an `img_size` override is not reflected in the pretrained config)."""
    from timm.data import create_transform, resolve_data_config
    overrides = {}
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        overrides["input_size"] = (3, *img_size)
    return create_transform(**resolve_data_config(overrides, model=model), is_training=False)


def image_folder(root: str, split: str, transform=None):
    """torchvision ImageFolder over `<root>/<split>`."""
    from torchvision.datasets import ImageFolder
    return ImageFolder(os.path.join(root, split), transform=transform)


def calibration_images(root: str, transform, nsamples: int, seed: int, bsz: int) -> list[torch.Tensor]:
    """`nsamples` seeded random train images, transformed, as a list of batches [<=bsz, 3, H, W]."""
    data = image_folder(root, "train", transform)
    if nsamples > len(data):
        raise DataError(f"--nsamples {nsamples} exceeds the {len(data)} images in {os.path.join(root, 'train')}")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:nsamples].tolist()
    images = torch.stack([data[i][0] for i in idx])
    return list(images.split(bsz))


def eval_loader(root: str, transform, bsz: int, limit: int | None = None, seed: int = 0,
                workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches (images, labels) of the val split, or of its first `limit` images after a seeded permutation."""
    data = image_folder(root, "val", transform)
    if limit is not None:
        if limit <= 0:
            raise DataError(f"--val_limit must be positive, got {limit}")
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
        data = Subset(data, sorted(idx))
    return DataLoader(data, batch_size=bsz, shuffle=False, num_workers=workers, pin_memory=pin_memory)
