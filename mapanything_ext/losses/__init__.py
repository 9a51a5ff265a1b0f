"""Losses: the compact model's, the view-batched MapAnything criterion, its self-check against
MapAnything's own, and the parser of MapAnything's loss strings."""
