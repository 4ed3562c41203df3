"""ft: feature textualization for the neurons of BERT-family encoders."""

__version__ = "0.1.0"
