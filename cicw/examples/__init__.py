"""Small runnable illustrations of the method."""
