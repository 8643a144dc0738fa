"""Everything that touches mace-torch internals: model loading, latents by readout hooks, trainer hooks."""
