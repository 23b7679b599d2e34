"""Cluster jobs: thin Ray layers over `sampler/` (teacher data, sampler training, batch generation,
evaluation). The same code runs on a laptop (`ray.init()`) and on a cluster (`ray job submit`)."""
