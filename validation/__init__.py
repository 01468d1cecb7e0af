"""Runtime reference: apply each method for real and measure one training step."""
