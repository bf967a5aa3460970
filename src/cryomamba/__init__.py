"""CryoMamba."""
