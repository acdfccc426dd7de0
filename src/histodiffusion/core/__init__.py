"""Computations the stages share, without stage knowledge: classifier guidance (guidance.py), metrics
(metrics.py), the merged downstream results (evalsummary.py), the dihedral transforms (transforms.py),
the seed derivation (seeds.py) and image grids (grids.py). Apart from the PNG of `grids.write_grid` and
the feature-reference .npz of `metrics.save_reference`/`load_reference`, nothing here reads or writes files.
"""
