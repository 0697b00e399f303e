"""Training losses: stage 1 (L1 + Dice), stage 2 (MSE + edge-aware DISTS + GAN), DISTS and its VGG16 trunk."""
