"""Geometry: camera projection and point/ray maps (projection), rotations and quaternions, depth metrics."""
