"""Synthetic visible watermarks, for making training data for a CLIP-based watermark head.

``add_visible_watermark(img, rng)`` draws one of the marks stock sites and photographers put on
images, at a random opacity in [0.1, 0.6]:

- ``tiled``: a text repeated over the whole image in a grid, often rotated;
- ``corner``: one text (a name, a URL, a copyright line) near a corner or the bottom edge;
- ``logo``: a simple emblem (a ring, a rounded box or a diamond with initials), in a corner or
  the centre;
- ``banner``: a translucent band across the image with a text on it.

Fonts are PIL's own, so the same seed gives the same pixels everywhere: its scalable default font
(Aileron) at several sizes, plain, bold (stroked) or outlined, and its bitmap font scaled up (a
blocky, different letterform). Plain PIL and numpy; no model.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

KINDS = ("tiled", "corner", "logo", "banner")
OPACITY = (0.1, 0.6)
TEXTS = ["© stockphoto", "SAMPLE", "PREVIEW", "shutterpix.com", "© J. Doe Photography", "www.imagebank.net",
         "DO NOT COPY", "© 2021 pixelstore", "getimages", "watermark", "PROOF", "studio lumen", "© alamy-like",
         "dreamstock", "photo by M. Rossi", "iStockish", "COPYRIGHT", "preview only", "lensworks.io", "©"]
COLORS = [(255, 255, 255), (0, 0, 0), (200, 200, 200), (40, 40, 40), (255, 230, 90), (220, 40, 40), (60, 120, 230)]


def _font(rng: np.random.Generator, px: int):
    """(font, style, stroke width, name): the scalable default font, or the bitmap one (None)."""
    if rng.random() < 0.2:
        return None, "bitmap", 0, "pil-bitmap"
    style = str(rng.choice(["plain", "bold", "outline"]))
    stroke = 0 if style == "plain" else max(1, px // 18)
    return ImageFont.load_default(size=max(8, px)), style, stroke, "pil-default"


def _text_layer(text: str, px: int, color, alpha: int, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """A transparent RGBA image holding ``text`` about ``px`` pixels high."""
    font, style, stroke, name = _font(rng, px)
    if font is None:  # the bitmap font is ~11 px high: draw small, scale up (blocky letters)
        small = ImageFont.load_default_imagefont()
        l, t, r, b = small.getbbox(text)
        tile = Image.new("RGBA", (r - l + 2, b - t + 2), (0, 0, 0, 0))
        ImageDraw.Draw(tile).text((1 - l, 1 - t), text, font=small, fill=(*color, alpha))
        scale = max(1.0, px / max(1, b - t))
        tile = tile.resize((max(1, int(tile.width * scale)), max(1, int(tile.height * scale))), Image.NEAREST)
        return tile, {"font": name, "style": style, "size": px}
    l, t, r, b = font.getbbox(text, stroke_width=stroke)
    tile = Image.new("RGBA", (r - l + 4, b - t + 4), (0, 0, 0, 0))
    other = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
    fill = (*color, alpha) if style != "outline" else (0, 0, 0, 0)
    stroke_fill = (*(color if style == "outline" else other), alpha if style == "outline" else alpha // 2)
    ImageDraw.Draw(tile).text((2 - l, 2 - t), text, font=font, fill=fill, stroke_width=stroke,
                              stroke_fill=stroke_fill if stroke else None)
    return tile, {"font": name, "style": style, "size": px}


def _logo(px: int, color, alpha: int, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    shape = str(rng.choice(["ring", "box", "diamond"]))
    img = Image.new("RGBA", (px, px), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    w = max(2, px // 12)
    if shape == "ring":
        d.ellipse([w, w, px - w, px - w], outline=(*color, alpha), width=w)
    elif shape == "box":
        d.rounded_rectangle([w, w, px - w, px - w], radius=px // 5, outline=(*color, alpha), width=w)
    else:
        c = px / 2
        d.polygon([(c, w), (px - w, c), (c, px - w), (w, c)], outline=(*color, alpha), width=w)
    letters = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTVWXYZ"), size=int(rng.integers(1, 3))))
    font = ImageFont.load_default(size=max(8, px // 3))
    l, t, r, b = font.getbbox(letters)
    d.text(((px - (r - l)) / 2 - l, (px - (b - t)) / 2 - t), letters, font=font, fill=(*color, alpha))
    return img, {"shape": shape, "text": letters, "size": px}


def add_visible_watermark(img: Image.Image, rng: np.random.Generator, kind: str | None = None
                          ) -> tuple[Image.Image, dict]:
    """``img`` with one visible watermark; and what was drawn (kind, text, opacity, font, size...)."""
    base = img.convert("RGBA")
    w, h = base.size
    kind = kind or str(rng.choice(KINDS))
    opacity = float(rng.uniform(*OPACITY))
    alpha = int(round(255 * opacity))
    color = COLORS[int(rng.integers(len(COLORS)))]
    text = str(rng.choice(TEXTS))
    side = min(w, h)
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    info: dict = {"kind": kind, "opacity": round(opacity, 4), "color": list(color)}
    if kind == "tiled":
        px = int(max(8, side * rng.uniform(0.04, 0.12)))
        tile, finfo = _text_layer(text, px, color, alpha, rng)
        angle = float(rng.choice([0, 0, 30, -30, 45, -45]))
        diag = int(math.hypot(w, h)) + tile.width
        big = Image.new("RGBA", (diag, diag), (0, 0, 0, 0))
        sx, sy = int(tile.width * rng.uniform(1.3, 2.2)), int(tile.height * rng.uniform(2.0, 4.0))
        for row, y in enumerate(range(0, diag - tile.height, max(1, sy))):
            for x in range((row % 2) * sx // 2, diag - tile.width, max(1, sx)):
                big.alpha_composite(tile, (x, y))
        big = big.rotate(angle, resample=Image.BICUBIC) if angle else big
        layer = big.crop(((diag - w) // 2, (diag - h) // 2, (diag - w) // 2 + w, (diag - h) // 2 + h))
        info.update(text=text, angle=angle, **finfo)
    elif kind in ("corner", "banner"):
        px = int(max(8, side * rng.uniform(0.05, 0.14 if kind == "corner" else 0.18)))
        tile, finfo = _text_layer(text, px, color, alpha, rng)
        if tile.width > w * 0.95:  # too wide for the image: shrink it
            tile = tile.resize((int(w * 0.9), max(1, int(tile.height * w * 0.9 / tile.width))), Image.LANCZOS)
        m = int(side * 0.03)
        if kind == "banner":
            band = int(tile.height * 1.6)
            y0 = int(rng.uniform(0.15, 0.85) * (h - band))
            ImageDraw.Draw(layer).rectangle([0, y0, w, y0 + band], fill=(*COLORS[int(rng.integers(len(COLORS)))],
                                                                        int(alpha * 0.6)))
            layer.alpha_composite(tile, ((w - tile.width) // 2, y0 + (band - tile.height) // 2))
            info.update(text=text, **finfo)
        else:
            where = str(rng.choice(["top-left", "top-right", "bottom-left", "bottom-right", "bottom-centre"]))
            x = {"left": m, "right": w - tile.width - m, "centre": (w - tile.width) // 2}[where.split("-")[1]]
            y = m if where.startswith("top") else h - tile.height - m
            layer.alpha_composite(tile, (max(0, x), max(0, y)))
            info.update(text=text, position=where, **finfo)
    elif kind == "logo":
        px = int(max(12, side * rng.uniform(0.12, 0.35)))
        logo, linfo = _logo(px, color, alpha, rng)
        where = str(rng.choice(["centre", "top-left", "top-right", "bottom-left", "bottom-right"]))
        m = int(side * 0.03)
        x = (w - px) // 2 if where == "centre" else (m if "left" in where else w - px - m)
        y = (h - px) // 2 if where == "centre" else (m if where.startswith("top") else h - px - m)
        layer.alpha_composite(logo, (max(0, x), max(0, y)))
        info.update(position=where, **linfo)
    else:
        raise ValueError(f"unknown watermark kind {kind!r}; known: {', '.join(KINDS)}")
    return Image.alpha_composite(base, layer).convert("RGB"), info
