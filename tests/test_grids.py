"""The one grid writer (grids.py)."""
import numpy as np
import torch
from PIL import Image

from histodiffusion.core.grids import tile_grid, to_uint8, write_grid


def test_tiles_sit_in_rows_with_white_gaps(tmp_path):
    tiles = np.stack([np.full((4, 6, 3), k, np.uint8) for k in range(5)])
    grid = tile_grid(tiles, cols=2)
    assert grid.shape == (3 * 6 + 2, 2 * 8 + 2, 3)
    assert (grid[2:6, 10:16] == 1).all() and (grid[14:18, 2:8] == 4).all()  # tile 1: row 0, col 1; tile 4: row 2
    assert (grid[:2] == 255).all() and (grid[:, 8:10] == 255).all() and (grid[14:18, 10:16] == 255).all()
    assert tile_grid(tiles).shape == (2 * 6 + 2, 3 * 8 + 2, 3)  # near-square by default
    write_grid(tiles, tmp_path / "g.png", cols=2)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), grid)


def test_float_images_map_to_uint8():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
