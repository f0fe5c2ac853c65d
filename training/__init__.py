"""Training programs, kept apart from the serving runtime: `training.default_model` trains and evaluates the
embedded default model whose weights the runtime ships in serving/default_model/."""
