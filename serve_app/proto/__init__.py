"""The application's public gRPC API (`raycache.proto`) and the modules generated from it."""
