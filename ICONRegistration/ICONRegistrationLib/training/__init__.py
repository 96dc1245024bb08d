"""Training GradICON-family networks: data preparation and the resumable training loop."""
