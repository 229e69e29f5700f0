"""Plain nn.Modules: vision encoder, language model, conditioner, latent diffusion, contrastive temperature."""
