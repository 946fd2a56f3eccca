"""Stage 1, one home for image -> asset: image preparation now; geometry and latent sampling to come (issue 12)."""
