"""File formats of the official HAODiff release."""
