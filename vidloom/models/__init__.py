"""Model code: one file per family plus the pieces families share."""
