"""Networks: shared layers, the Swin DPG, Performer prompt embedders, the one-step restorer, the latent discriminator."""
