import numpy as np
import torch

from maelab.analysis.viz import RECONSTRUCTION_ROWS, label_grid, reconstruction_grid


def test_label_grid_names_rows_and_columns_in_margins():
    grid = reconstruction_grid(torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.rand(3, 16) > 0.5)
    out = label_grid(grid, RECONSTRUCTION_ROWS, ["image 0", "image 1", "image 2"], margin=104, header=16)
    assert out.shape == (grid.shape[0] + 16, grid.shape[1] + 104, 3) and out.dtype == np.uint8
    assert (out[16:, 104:] == grid).all()  # the pictures themselves are untouched
    cell = grid.shape[0] // 3
    for i in range(3):  # dark text in the left margin at every row's height, nowhere else white is broken
        band = out[16 + i * cell : 16 + (i + 1) * cell, :104]
        assert (band < 128).any(), f"row {i} has no label"
    for j in range(3):
        strip = out[:16, 104 + j * (grid.shape[1] // 3) : 104 + (j + 1) * (grid.shape[1] // 3)]
        assert (strip < 128).any(), f"column {j} has no label"
    blank = label_grid(grid, ["", "", ""], ["", "", ""])
    assert (blank[:16] == 255).all() and (blank[:, :104] == 255).all()
