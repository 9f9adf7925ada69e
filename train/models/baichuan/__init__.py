"""Baichuan and Baichuan2 in plain PyTorch: the modules (`model`), hub checkpoints in and out
(`hub`), and everything that names Baichuan's submodules for the parallel strategies."""
