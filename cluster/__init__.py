"""raycache's cache itself: keys, local caches, directory. Knows nothing of Ray Serve."""
