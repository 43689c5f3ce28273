"""Pictures of what a model learned (``python -m fineclip.viz``): dense-feature maps, text heatmaps,
box-classification confusion, training curves; the arrays behind them live in ``maps``."""
