"""Protocol Buffers of the cluster's own services, and the modules generated from them."""
