"""Thin builders around diffusers / timm models."""


def norm_groups(channels, most: int = 32) -> int:
    """The largest GroupNorm group count (a power of two, at most `most`) dividing every width in `channels`
    (an int or a sequence), so tiny test models work."""
    widths = [int(channels)] if isinstance(channels, int) else [int(c) for c in channels]
    return next(g for g in (32, 16, 8, 4, 2, 1) if g <= most and all(c % g == 0 for c in widths))
