"""haodiff_model: HAODiff networks (DPG, prompt embedders, restorer, discriminator), losses and trainers."""
