"""A real, small, offline vision benchmark: scikit-learn's handwritten digits as an ImageFolder, and a ViT trained on it.

Data: `sklearn.datasets.load_digits()` (1,797 real 8x8 digits, 10 classes, values 0..16) scaled to 0..255, upscaled
bilinearly to 32x32 and written as RGB PNG; image i goes to val/ when i % 5 == 0 (360 images), else train/ (1,437).
Model: timm `vit_tiny_patch16_224` with MODEL_KWARGS (32x32 input, 4x4 patches -> 64 tokens + cls, width 96, depth 6,
3 heads, 10 classes), trained from scratch on train/ through the same eval transform `vit_quant/main.py` uses,
plus random +-2 px shifts; AdamW (lr 2e-3, weight decay 0.05), cosine schedule with 2 warm-up epochs, batch 64,
label smoothing 0.1, `--epochs` (default 40), seed 0.

    python -m common.data.digits --out assets/digits          # writes train/, val/, vit_digits.safetensors, vit_digits.json
    python vit_quant/main.py --model vit_tiny_patch16_224 --model_kwargs "$(python -m common.data.digits --print_kwargs)" \
        --checkpoint assets/digits/vit_digits.safetensors --data_path assets/digits --w_bits 4 --a_bits 4 ...
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

__all__ = ["MODEL", "MODEL_KWARGS", "write_digits", "train_digits_vit", "main"]

MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3, "num_classes": 10}
IMAGE_SIZE = 32
VAL_EVERY = 5


def write_digits(out: str, size: int = IMAGE_SIZE) -> dict[str, int]:
    """Write `out`/train/<digit>/<i>.png and `out`/val/<digit>/<i>.png; returns the image count per split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {"train": 0, "val": 0}
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if i % VAL_EVERY == 0 else "train"
        folder = os.path.join(out, split, str(int(label)))
        os.makedirs(folder, exist_ok=True)
        pixels = (img * (255.0 / 16.0)).round().clip(0, 255).astype("uint8")
        Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).convert("RGB").save(
            os.path.join(folder, f"{i:04d}.png"))
        counts[split] += 1
    return counts


def _load_split(root: str, split: str, transform) -> tuple[torch.Tensor, torch.Tensor]:
    from common.data.imagefolder import image_folder
    data = image_folder(root, split, transform)
    images, labels = zip(*(data[i] for i in range(len(data))))
    return torch.stack(images), torch.tensor(labels)


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation of each image by up to +-max_shift pixels (background = the image's corner value)."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def _accuracy(model, images, labels, bsz: int = 256) -> float:
    model.eval()
    correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in zip(images.split(bsz), labels.split(bsz)))
    return 100.0 * correct / len(labels)


def train_digits_vit(root: str, epochs: int = 40, seed: int = 0, device: str = "cpu", bsz: int = 64,
                     lr: float = 2e-3, weight_decay: float = 0.05) -> tuple[torch.nn.Module, dict]:
    """Train MODEL(**MODEL_KWARGS) from scratch on `root`/train; returns (model, {"val_top1": ..., ...})."""
    import timm
    from tqdm import tqdm

    from common.data.imagefolder import model_transform

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = timm.create_model(MODEL, pretrained=False, **MODEL_KWARGS).to(device)
    transform = model_transform(model)
    xtr, ytr = _load_split(root, "train", transform)
    xva, yva = _load_split(root, "val", transform)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(ytr) / bsz)
    total = epochs * steps_per_epoch
    warmup = min(2 * steps_per_epoch, total // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    t0 = time.time()
    bar = tqdm(range(epochs), desc="train digits ViT", unit="epoch")
    for _ in bar:
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        for idx in perm.split(bsz):
            x = _shift(xtr[idx], 2, gen).to(device)
            loss = F.cross_entropy(model(x), ytr[idx].to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model = model.cpu().eval()
    info = {"model": MODEL, "model_kwargs": MODEL_KWARGS, "epochs": epochs, "seed": seed, "bsz": bsz, "lr": lr,
            "weight_decay": weight_decay, "train_images": len(ytr), "val_images": len(yva),
            "train_top1": _accuracy(model, xtr, ytr), "val_top1": _accuracy(model, xva, yva),
            "train_seconds": round(time.time() - t0, 1)}
    return model, info


def _atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    write(tmp)
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m common.data.digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="assets/digits", help="output folder (train/, val/, checkpoint)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--print_kwargs", action="store_true", help="print MODEL_KWARGS as JSON and exit")
    args = p.parse_args(argv)
    if args.print_kwargs:
        print(json.dumps(MODEL_KWARGS))
        return {}
    from safetensors.torch import save_file

    counts = write_digits(args.out)
    print(f"wrote {counts['train']} train / {counts['val']} val images under {args.out}", file=sys.stderr)
    model, info = train_digits_vit(args.out, epochs=args.epochs, seed=args.seed, device=args.device)
    ckpt = os.path.join(args.out, "vit_digits.safetensors")
    _atomic_write(ckpt, lambda t: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, t))
    _atomic_write(os.path.join(args.out, "vit_digits.json"), lambda t: _write_text(t, json.dumps(info, indent=2) + "\n"))
    print(json.dumps(info, indent=2))
    print(f"python vit_quant/main.py --model {MODEL} --model_kwargs '{json.dumps(MODEL_KWARGS)}' "
          f"--checkpoint {ckpt} --data_path {args.out} --val_limit {info['val_images']}")
    return info


if __name__ == "__main__":
    main()
