"""inkpipe.train: datasets, samplers, augmentation, models, losses and the training loop."""
