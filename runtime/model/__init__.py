"""The model: hyper-parameters (config), model families as data, weights and the one graph."""
