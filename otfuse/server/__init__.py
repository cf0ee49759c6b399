"""The Flower ServerApp of otfuse."""
