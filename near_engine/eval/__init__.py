"""Evaluation: image metrics (`metrics`) and the paper-style evaluation against Cycles ground truth (`tasks`)."""
