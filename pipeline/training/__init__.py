"""Fine-tuning: the LightningModule, packing, distributed strategies and the encoder head."""
