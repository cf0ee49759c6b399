"""The Flower ClientApp of otfuse."""
