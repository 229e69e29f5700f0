"""What training any capdiff recipe shares: the optimizer and its schedule (`optimization`), the EMA of the
weights (`ema`), skipping non-finite steps (`nonfinite`) and sample grids during training (`samples`)."""
