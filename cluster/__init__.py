"""Cluster YAMLs (local fake-multinode autoscaling, AWS, GCP, KubeRay) and helpers to load them."""
