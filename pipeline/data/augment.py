"""Training-time image augmentation: random shifts (pad, then crop back at a random offset)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, pad: int) -> torch.Tensor:
    """B x C x H x W images each moved by up to `pad` pixels in x and y (edges replicated).

    Behaviour cloning from ~50 demos per task memorises exact pixel positions; shifts of 4 px on a
    64 px frame (DrQ's setting) make the encoder locate objects relative to the gripper instead.
    """
    if pad <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    xs = torch.randint(0, 2 * pad + 1, (b,)).tolist()
    ys = torch.randint(0, 2 * pad + 1, (b,)).tolist()
    return torch.stack([padded[i, :, y:y + h, x:x + w] for i, (x, y) in enumerate(zip(xs, ys))])
