"""Ray Serve side of the project: the served-checkpoint format, request validation, the model
deployment (HTTP JSON API, dynamic batching, autoscaling, health checks, canary routing) and the
canary gate. ``jobs/serve.py`` deploys and rolls out through these modules."""
