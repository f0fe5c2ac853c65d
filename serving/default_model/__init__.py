"""The embedded default model: a tiny NemotronH-layout hybrid (Mamba2 + attention + MLP) trained on a synthetic
multi-turn chat task that needs memory across turns. `MODEL_DIR` holds config.json, model.safetensors and
byte_tokenizer.json; the training program, training/default_model/ (`python -m training.default_model.train`),
reproduces it on CPU (see README.md)."""
import os

MODEL_DIR = os.path.dirname(os.path.abspath(__file__))

__all__ = ["MODEL_DIR"]
