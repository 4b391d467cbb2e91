"""Clean upscaling of the demo model's small, flat-colour output.

Bilinear or bicubic upscaling of a 32x32 image smears every edge over a band as wide as the scale
factor (16 px at 512), and nearest-neighbour leaves visible staircases. Our images are a few flat
colours, so we upscale the *segmentation* instead of the pixels: the native image is clustered into
its dominant colours, each pixel's soft membership of each colour is interpolated to the target size
(which yields smooth contours, not blocks), and a steep softmax over the memberships turns them back
into crisp regions with an edge about one output pixel wide. Flat regions stay exactly flat. An
image that is not a handful of flat colours (a photo passed through img2img) falls back to bicubic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MAX_COLOURS = 8
_RADIUS = 0.12  # colour distance (in [0, 1] RGB) that still counts as the same flat colour
_MIN_FRACTION = 0.012  # a flat colour covers at least this much of the image (a small shape does)


def _dominant_colours(pixels: torch.Tensor) -> torch.Tensor | None:
    """Up to _MAX_COLOURS flat colours covering the image, or None if it is not flat."""
    remaining = torch.ones(pixels.shape[0], dtype=torch.bool)
    least = max(3, int(_MIN_FRACTION * pixels.shape[0]))
    centres: list[torch.Tensor] = []
    while int(remaining.sum()) >= least and len(centres) < _MAX_COLOURS:
        rest = pixels[remaining]
        bins = (rest * 7.999).long()
        keys = bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]
        mode = torch.bincount(keys).argmax()
        centre = rest[keys == mode].mean(0)
        members = remaining & ((pixels - centre).norm(dim=1) < _RADIUS)
        if int(members.sum()) < least:
            break
        remaining &= ~members
        centre = pixels[members].mean(0)
        if not _is_blend(centre, centres):
            centres.append(centre)
    # Left-over pixels are edges between flat regions; too many means the image is not flat.
    if not centres or float(remaining.float().mean()) > 0.35:
        return None
    return torch.stack(centres)


def _is_blend(colour: torch.Tensor, centres: list[torch.Tensor]) -> bool:
    """Whether a colour lies between two known flat colours: an antialiased edge, not a region."""
    for i, a in enumerate(centres):
        for b in centres[i + 1 :]:
            axis = b - a
            t = float(((colour - a) * axis).sum() / (axis * axis).sum().clamp(min=1e-6))
            if 0.0 < t < 1.0 and float((a + t * axis - colour).norm()) < _RADIUS:
                return True
    return False


def _coverage(pixels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(pixels, k) share of each flat colour in each pixel.

    An antialiased edge pixel is a linear blend of its two nearest flat colours; its position on
    the segment between them is the coverage, which interpolates to the true contour.
    """
    dist2 = ((pixels[:, None] - centres[None]) ** 2).sum(-1)
    if len(centres) == 1:
        return torch.ones_like(dist2)
    near = dist2.topk(2, dim=1, largest=False).indices
    a, b = centres[near[:, 0]], centres[near[:, 1]]
    axis = b - a
    t = (((pixels - a) * axis).sum(1) / (axis * axis).sum(1).clamp(min=1e-6)).clamp(0, 1)
    share = torch.zeros_like(dist2)
    share.scatter_(1, near[:, :1], (1 - t)[:, None])
    share.scatter_add_(1, near[:, 1:], t[:, None])
    return share


def _soften(member: torch.Tensor) -> torch.Tensor:
    """A slight blur of the coverage maps, so contours follow the shape and not the pixel grid."""
    k = torch.tensor([0.2, 0.6, 0.2])
    kernel = (k[:, None] * k[None, :]).expand(member.shape[1], 1, 3, 3)
    padded = F.pad(member, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel, groups=member.shape[1])


def _render_regions(pixels: torch.Tensor, centres: torch.Tensor, n: int, side: int) -> torch.Tensor:
    """The flat-colour regions of an n x n image drawn at side x side with crisp smooth edges."""
    member = _soften(_coverage(pixels, centres).T.reshape(1, -1, n, n))
    member = F.interpolate(member, size=(side, side), mode="bicubic", align_corners=False)
    # Coverage changes by about 1/scale per output pixel across an edge; this steepness makes the
    # blend between two regions about one output pixel wide (antialiased, not blurred).
    weights = torch.softmax(member[0] * (2.0 * side / n), dim=0)
    return torch.einsum("khw,kc->chw", weights, centres)


def upscale(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (3, n, n) image in [0, 1] upscaled to (3, height, width), flat regions kept flat.

    A non-square target gets the square image in its middle and the background colour (the
    commonest border colour) on the sides, rather than a stretched or cropped picture.
    """
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    n = image.shape[-1]
    pixels = image.reshape(3, -1).T.float()
    centres = _dominant_colours(pixels)
    if centres is None:
        square = F.interpolate(
            image[None].float(), size=(side, side), mode="bicubic", align_corners=False
        )[0].clamp(0, 1)
        background = image[:, 0, 0].float()
    else:
        square = _render_regions(pixels, centres, n, side)
        border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
        nearest = ((border.T.float()[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        background = centres[torch.bincount(nearest, minlength=len(centres)).argmax()]
    if side == height == width:
        return square
    out = background[:, None, None].expand(3, height, width).clone()
    out[:, top : top + side, left : left + side] = square
    return out
