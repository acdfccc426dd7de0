"""The one dihedral transform every stage uses (transforms.py)."""
import torch

from histodiffusion.core.transforms import DIHEDRAL, dihedral, flip_then_rotate


def test_dihedral_gives_the_eight_distinct_symmetries_in_any_layout():
    x = torch.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    views = [dihedral(x, k) for k in range(DIHEDRAL)]
    assert torch.equal(views[0], x) and len({v.numpy().tobytes() for v in views}) == DIHEDRAL
    assert torch.equal(views[4], x.flip(-1)) and torch.equal(views[1], torch.rot90(x, 1, dims=(-2, -1)))
    nhwc = x.permute(0, 2, 3, 1)  # channels last: the image axes are given
    for k in range(DIHEDRAL):
        assert torch.equal(dihedral(nhwc, k, dims=(1, 2)), views[k].permute(0, 2, 3, 1))


def test_flip_then_rotate_names_the_same_transform():
    x = torch.arange(25).reshape(1, 5, 5)
    for turns in range(-4, 8):
        assert torch.equal(dihedral(x, flip_then_rotate(False, turns)), torch.rot90(x, turns, dims=(-2, -1)))
        assert torch.equal(dihedral(x, flip_then_rotate(True, turns)), torch.rot90(x.flip(-1), turns, dims=(-2, -1)))


def test_match_color_sets_channel_means_and_stds():
    import numpy as np

    from histodiffusion.core.transforms import match_color

    rng = np.random.default_rng(0)
    x = rng.integers(60, 120, (16, 16, 3)).astype(np.uint8)
    ref = rng.integers(100, 250, (16, 16, 3)).astype(np.uint8)
    y = match_color(x, ref).astype(float)
    assert np.allclose(y.mean((0, 1)), ref.mean((0, 1)), atol=0.6)
    assert np.allclose(y.std((0, 1)), ref.std((0, 1)), atol=0.6)
    flat = np.full((4, 4, 3), 7, np.uint8)  # no spread to scale: the reference's mean
    assert (match_color(flat, ref) == np.round(ref.mean((0, 1))).astype(np.uint8)).all()
    assert match_color(x, x).tolist() == x.tolist()


def test_add_detail_adds_the_tiles_loss_and_clips():
    import numpy as np

    from histodiffusion.core.transforms import add_detail

    rng = np.random.default_rng(1)
    tile = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    rec = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    assert (add_detail(rec, tile, rec) == tile).all()  # an image that is the reconstruction gives the tile back
    img = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    got = add_detail(img, tile, rec)
    want = np.clip(img.astype(int) + tile.astype(int) - rec.astype(int), 0, 255)  # no uint8 wrap-around
    assert got.dtype == np.uint8 and (got == want).all() and got.min() == 0 and got.max() == 255
