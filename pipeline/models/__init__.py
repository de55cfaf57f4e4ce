"""Networks (backbones, heads, decoders), losses and the LightningModules that train them."""
