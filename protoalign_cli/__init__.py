"""protoalign: prototype-guided latent alignment for fine-tuning MACE foundation models."""

__version__ = "0.1.0"
