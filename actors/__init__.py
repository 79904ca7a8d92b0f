"""What runs on the cluster: data loader actors, DeepSpeed trainers, Serve deployments."""
