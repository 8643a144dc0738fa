"""Stage 2: per-element prototypes of source latents (build) and the nearest-prototype search (assignment)."""
