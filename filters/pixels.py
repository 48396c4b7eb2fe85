"""The inputs of models that read pixels of their own (not the CLIP embedding), e.g. LAION's
watermark classifier: the PIL half runs where images are decoded (the same decoded image as the
CLIP input: one decode per image), the tensor half next to the model. Together they compute what
``Compose([convert("RGB"), Resize(size), ToTensor(), Normalize(mean, std)])`` computes."""

from __future__ import annotations

import numpy as np

from shardsmith.filters.scores import PixelInput


class PixelInputTransform:
    """PIL image in, uint8 (H, W, 3) RGB array of ``input.size`` out: ``convert("RGB")``, then
    torchvision's ``Resize(size)`` (bilinear, a squash to exactly that size)."""

    def __init__(self, pixel_input: PixelInput):
        from torchvision.transforms import Resize

        self.input = pixel_input
        self.resize = Resize(tuple(pixel_input.size))

    def __call__(self, img) -> np.ndarray:
        return np.asarray(self.resize(img.convert("RGB")), dtype=np.uint8)


def to_tensor(pixels: np.ndarray, pixel_input: PixelInput):
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W), exactly as ToTensor + Normalize."""
    import torch
    from torchvision.transforms import Normalize

    x = torch.from_numpy(np.require(pixels, requirements=["C", "W"])).permute(0, 3, 1, 2).contiguous()
    x = x.to(dtype=torch.get_default_dtype()).div(255)
    return Normalize(list(pixel_input.mean), list(pixel_input.std))(x)
