"""inkpipe.numerics: numeric tools that training and prediction share.

``metrics`` (confusion counts, F-beta, the threshold search) and ``blending`` (Gaussian-weighted
sliding-window prediction over a fragment). Arrays only: this package reads no files and knows
no model. It imports ``inkpipe.pipeline`` (windows, checks, errors) and nothing above it.
"""
