"""raycache's Ray Serve application: ingress, model replicas, built-in models."""
