"""Statistics of layer outputs over data: exact-to-merge accumulators and the passes that fill them."""
