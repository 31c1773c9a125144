"""vqt-cache: Visual Query Tuning over cached ViT keys/values (Tu, Mai, Chao, CVPR 2023)."""

__version__ = "0.1.0"
