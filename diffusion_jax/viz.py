"""Pictures people look at: sample grids, the reverse process, metric plots (PNG)."""
from __future__ import annotations

import pathlib

import numpy as np


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (the pixels' one conversion each way: this and `to_uint8`)."""
    return np.asarray(images_uint8).astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255] (rounded, clipped)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, ncols: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> one uint8 image [rows*(H+pad)+pad, cols*(W+pad)+pad, C]."""
    images = to_uint8(images)
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_image(array: np.ndarray, path) -> str:
    from PIL import Image

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return str(path)


def auto_upscale(height: int) -> int:
    """Upscale small images (8x8 digits) so a person can see them."""
    return max(1, 64 // height)


def save_grid(images, path, ncols: int | None = None) -> str:
    images = np.asarray(images)
    up = auto_upscale(images.shape[1])
    return save_image(make_grid(images, ncols, pad=max(1, up // 2), upscale=up), path)


def save_reverse_process(trajectory: dict, path, num_images: int = 8) -> str:
    """Rows of x_t then predicted x0 along the chain, one column per saved step, for the first
    `num_images` samples: the picture of denoising."""
    x_t = np.asarray(trajectory["x_t"])[:, :num_images]        # [S, N, H, W, C]
    x0 = np.asarray(trajectory["pred_x0"])[:, :num_images]
    steps = x_t.shape[0]
    rows = []
    for i in range(x_t.shape[1]):
        rows.append(x_t[:, i])
        rows.append(x0[:, i])
    return save_image(make_grid(np.concatenate(rows), ncols=steps,
                                upscale=auto_upscale(x_t.shape[2])), path)


def save_metric_plot(x, series: dict, path, xlabel: str = "timestep t", title: str = "") -> str:
    """One panel per named series against x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items()):
        ax.plot(x, values, marker="o")
        ax.set_xlabel(xlabel)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
