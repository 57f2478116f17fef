"""Standalone exports of trained models: TorchScript, StableHLO, safetensors.

Imports nothing heavy; import the submodule you need (e.g. `trainkit.export.torchscript`).
"""
