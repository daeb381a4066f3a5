"""methods.tuners."""
