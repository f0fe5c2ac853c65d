"""The training program of the embedded default model (serving/default_model/ holds what it produced: config.json,
model.safetensors, byte_tokenizer.json, training.json; serving/default_model/README.md describes it).

* train.py      `python -m training.default_model.train`: trains it on CPU and writes the checkpoint
* evaluate.py   `python -m training.default_model.evaluate`: plays conversations turn by turn through the cached
                steps and scores them
* data.py       the synthetic conversations (facts, small talk, questions), split into training and held-out parts
* phrasings.py  the templates data.py draws its sentences from
* vocab.py      the word lists data.py draws its values from
"""
