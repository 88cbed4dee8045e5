"""HAT: config-driven training of models that run as integer programs on a J5-class ("bayes") accelerator.

Light to import: models, datasets, optimizers and stages register themselves the first time a config names
something (hat.registry.REGISTRANTS), so `import hat.quant` does not load the engine.
"""
__version__ = "0.1.0"
