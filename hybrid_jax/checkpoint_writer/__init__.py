"""The parts of the random-weight checkpoint writer (hybrid_jax/random_checkpoint.py, its public face and CLI):
arch (a config.json dict's model type and layers), plan (the tensors a real checkpoint stores), values (their
random values) and files (the safetensors files)."""
