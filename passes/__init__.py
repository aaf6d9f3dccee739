"""Graph passes, one module per technique."""
