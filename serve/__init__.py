"""Ray Serve application: OpenAI-style ingress + batched, autoscaled generator (see serve/app.py)."""
