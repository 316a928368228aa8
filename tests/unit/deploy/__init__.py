"""Checks of the deployment files (Kubernetes manifests, Dockerfiles, compose)."""
